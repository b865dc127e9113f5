//! Putting a code tarball into an image: byte-for-byte where the image resolves the
//! destination, and never a write on the host, whatever the tarball or the image contains.
//! Runs the real binary's chrooted child (`amibake internal-extract`) against an image root
//! made in a temp dir, with a canary on the host that must never change.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::util::small_filesystem::SmallFilesystem;
use crate::util::tarballs::{
    append_raw, assert_composer_like_at, composer_like, gzip, refused_on_their_own, tarball, Canary,
};
use amibake::host::extract::{
    check_tarball, extract_into_image, ExtractError, ExtractSpec, Tarball,
};
use sha2::Digest;
use tar::EntryType;
use tokio_util::sync::CancellationToken;

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

fn spec(dest: &str) -> ExtractSpec {
    ExtractSpec {
        dest: dest.into(),
        ..ExtractSpec::default()
    }
}

fn extract(image: &Image, dest: &str, owner: Option<&str>, tarball: &[u8]) -> crate::util::Run {
    extract_at(image.root(), dest, owner, &[], tarball)
}

fn extract_at(
    root: &Path,
    dest: &str,
    owner: Option<&str>,
    extra: &[&str],
    tarball: &[u8],
) -> crate::util::Run {
    let mut args = vec![
        "internal-extract".to_string(),
        "--root".into(),
        root.display().to_string(),
        "--dest".into(),
        dest.into(),
        "--isolation".into(),
        crate::util::isolation().to_arg(),
    ];
    if let Some(o) = owner {
        args.extend(["--owner".into(), o.into()]);
    }
    args.extend(extra.iter().map(|a| a.to_string()));
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
    crate::util::Run {
        command: format!("amibake {}", args.join(" ")),
        output,
    }
}

#[test]
fn a_composer_like_tarball_lands_byte_for_byte_where_the_image_resolves_dest() {
    let _module = crate::util::module_turn(module_path!());
    let (tar_bytes, files) = composer_like();
    for dest in ["/var/www/shop", "/opt/app"] {
        let image = Image::new();
        let canary = Canary::new();
        extract(&image, dest, Some("www-data"), &tar_bytes).expect_code(0);
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
    let _module = crate::util::module_turn(module_path!());
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
    let full = composer_like().0;
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
            refused_with: Some("tarball entry 2 (etc-link/pwned): its path leaves the destination through a symlink"),
        },
        Case {
            name: "magic link through /proc/<pid>/root to the host, then a write through it",
            bytes: tarball(|b| {
                append_raw(b, EntryType::Symlink, "x", Some(&format!("/proc/{}/root{canary_dir}", std::process::id())), b"");
                append_raw(b, EntryType::Regular, "x/pwned", None, b"pwned");
            }),
            refused_with: Some("tarball entry 2 (x/pwned): its path leaves the destination through a symlink"),
        },
        Case {
            name: "magic link through /proc/self/cwd, then a write through it",
            bytes: tarball(|b| {
                append_raw(b, EntryType::Symlink, "y", Some("/proc/self/cwd"), b"");
                append_raw(b, EntryType::Regular, "y/pwned", None, b"pwned");
            }),
            refused_with: Some("tarball entry 2 (y/pwned): its path leaves the destination through a symlink"),
        },
        Case {
            name: "relative symlink far up, then a write through it",
            bytes: tarball(|b| {
                append_raw(b, EntryType::Symlink, "up", Some("../../../../../../../../.."), b"");
                append_raw(b, EntryType::Regular, "up/etc/pwned", None, b"pwned");
            }),
            refused_with: Some("tarball entry 2 (up/etc/pwned): its path leaves the destination through a symlink"),
        },
        Case {
            name: "hard link through /proc/self/root",
            bytes: tarball(|b| append_raw(b, EntryType::Link, "hl2", Some(&format!("/proc/self/root{canary_file}")), b"")),
            refused_with: Some("tarball entry 1 (hl2): its link target"),
        },
        Case { name: "hard link to a host file", bytes: tarball(|b| append_raw(b, EntryType::Link, "hl", Some(&canary_file), b"")), refused_with: Some("tarball entry 1 (hl)") },
        Case { name: "device node", bytes: tarball(|b| append_raw(b, EntryType::Char, "dev-null", None, b"")), refused_with: Some("tarball entry 1 (dev-null): device nodes are not allowed") },
        Case { name: "fifo", bytes: tarball(|b| append_raw(b, EntryType::Fifo, "pipe", None, b"")), refused_with: Some("tarball entry 1 (pipe): FIFOs are not allowed") },
        Case { name: "truncated", bytes: full[..full.len() / 2].to_vec(), refused_with: Some("tarball") },
        // Only the check inflates: the extraction reads the tar stream the check kept, and a
        // compressed stream there is not a tar archive, whatever it would inflate to.
        Case { name: "a compressed stream", bytes: gzip(&tarball(|b| append_raw(b, EntryType::Regular, "../../escape.txt", None, b"out"))), refused_with: Some("tarball is damaged or not a tar archive") },
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
    let _module = crate::util::module_turn(module_path!());
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
    let _module = crate::util::module_turn(module_path!());
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
    let _module = crate::util::module_turn(module_path!());
    let (tar_bytes, files) = composer_like();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.tar");
    std::fs::write(&file, &tar_bytes).unwrap();
    let image = Image::new();
    let exe = Path::new(env!("CARGO_BIN_EXE_amibake"));
    let mut seen = Vec::new();
    let done = extract_into_image(
        exe,
        image.root(),
        &spec("/var/www/app"),
        &file,
        crate::util::isolation(),
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
        tar_bytes.len() as u64,
        "the whole tar stream was read"
    );
    assert!(seen
        .windows(2)
        .all(|w| w[1].0.files > w[0].0.files && w[1].0.bytes >= w[0].0.bytes && w[1].1 >= w[0].1));

    let err = extract_into_image(
        exe,
        image.root(),
        &spec("/var/www/app"),
        &dir.path().join("missing.tar"),
        crate::util::isolation(),
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
        &spec("/var/www/app"),
        &bad,
        crate::util::isolation(),
        |_, _| {},
        &CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "tarball entry 1 (../x): its path leaves the destination (`..`)"
    );
}

#[test]
fn dest_root_takes_files_but_magic_links_to_the_host_are_refused() {
    let _module = crate::util::module_turn(module_path!());
    let canary = Canary::new();
    let image = Image::new();
    let target = format!(
        "/proc/{}/root{}",
        std::process::id(),
        canary.path().display()
    );
    let bytes = tarball(|b| {
        append_raw(b, EntryType::Regular, "opt/app/ok", None, b"inside");
        append_raw(b, EntryType::Symlink, "x", Some(&target), b"");
        append_raw(b, EntryType::Regular, "x/pwned", None, b"pwned");
    });
    let run = extract(&image, "/", None, &bytes);
    run.expect_code(1);
    assert!(
        run.stderr().contains(
            "tarball entry 3 (x/pwned): its path leaves the destination through a symlink"
        ),
        "{}",
        run.dump()
    );
    assert_eq!(
        std::fs::read(image.root().join("opt/app/ok")).unwrap(),
        b"inside"
    );
    canary.assert_untouched("dest = /");
}

#[test]
fn an_image_whose_dest_or_etc_links_to_the_host_keeps_every_write_inside() {
    let _module = crate::util::module_turn(module_path!());
    let canary = Canary::new();
    let pid = std::process::id();
    let magic = format!("/proc/{pid}/root{}", canary.path().display());
    let bytes = tarball(|b| append_raw(b, EntryType::Regular, "pwned", None, b"pwned"));

    // dest itself is a magic link in the image: read inside the image, where it leads to
    // the image's own (empty) /proc, so there is nowhere to put the files.
    let image = Image::new();
    std::fs::create_dir_all(image.root().join("srv/www")).unwrap();
    std::os::unix::fs::symlink(&magic, image.root().join("srv/www/app")).unwrap();
    let run = extract(&image, "/srv/www/app", None, &bytes);
    run.expect_code(1);
    assert!(
        run.stderr()
            .contains("cannot create /srv/www/app in the image"),
        "{}",
        run.dump()
    );
    canary.assert_untouched("dest is a magic link");

    // The image's /etc is a link to the host's canary: the owner is looked up in the image.
    let image = Image::new();
    std::fs::remove_dir_all(image.root().join("etc")).unwrap();
    std::os::unix::fs::symlink(canary.path(), image.root().join("etc")).unwrap();
    let run = extract(&image, "/etc/app", Some("www-data"), &bytes);
    run.expect_code(1);
    assert!(
        run.stderr()
            .contains("owner `www-data`: cannot read the image's /etc/passwd"),
        "{}",
        run.dump()
    );
    // Without an owner: the same path inside the image, made there.
    let inside = image.root().join(canary.path().strip_prefix("/").unwrap());
    std::fs::create_dir_all(&inside).unwrap();
    extract(&image, "/etc/app", None, &bytes).expect_code(0);
    assert_eq!(std::fs::read(inside.join("app/pwned")).unwrap(), b"pwned");
    canary.assert_untouched("/etc links to the host");
}

#[test]
fn setuid_bits_are_dropped_unless_kept_and_the_owner_takes_dest_and_its_new_parents() {
    let _module = crate::util::module_turn(module_path!());
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let bytes = tarball(|b| {
        let mut h = crate::util::tarballs::header(EntryType::Regular, 2, 0o4755);
        b.append_data(&mut h, "bin/su-like", &b"#!"[..]).unwrap();
        let mut h = crate::util::tarballs::header(EntryType::Regular, 2, 0o2755);
        b.append_data(&mut h, "bin/sg-like", &b"#!"[..]).unwrap();
        let mut h = crate::util::tarballs::header(EntryType::Directory, 0, 0o2775);
        b.append_data(&mut h, "shared", std::io::empty()).unwrap();
    });
    let mode = |root: &Path, path: &str| {
        std::fs::metadata(root.join(path))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };

    let image = Image::new();
    let run = extract(&image, "/opt/app/current", Some("www-data"), &bytes);
    run.expect_code(0);
    assert!(
        run.stdout().contains("\"setuid_dropped\":2"),
        "{}",
        run.dump()
    );
    assert_eq!(mode(image.root(), "opt/app/current/bin/su-like"), 0o755);
    assert_eq!(mode(image.root(), "opt/app/current/bin/sg-like"), 0o755);
    assert_eq!(
        mode(image.root(), "opt/app/current/shared"),
        0o2775,
        "a directory's setgid only shares its group"
    );
    for dir in ["opt", "opt/app", "opt/app/current", "opt/app/current/bin"] {
        let meta = std::fs::metadata(image.root().join(dir)).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid()),
            (33, 33),
            "{dir} belongs to the owner"
        );
    }

    let image = Image::new();
    extract_at(image.root(), "/opt/app", None, &["--keep-setuid"], &bytes).expect_code(0);
    assert_eq!(mode(image.root(), "opt/app/bin/su-like"), 0o4755);
    assert_eq!(mode(image.root(), "opt/app/bin/sg-like"), 0o2755);
}

#[test]
fn running_out_of_space_names_the_entry_the_space_needed_and_the_space_free() {
    let _module = crate::util::module_turn(module_path!());
    let small = SmallFilesystem::new("1m");
    let big = vec![7u8; 3 << 20];
    let bytes = tarball(|b| {
        append_raw(b, EntryType::Regular, "small.txt", None, b"fits");
        append_raw(b, EntryType::Regular, "assets/big.bin", None, &big);
    });
    let run = extract_at(small.path(), "/app", None, &[], &bytes);
    run.expect_code(1);
    let err = run.stderr();
    assert!(
        err.contains("tarball entry 2 (assets/big.bin): no space left in the image: the entry needs 3145728 bytes and ")
            && err.contains("bytes are free on its filesystem; raise `root_volume_size_gb`"),
        "{}",
        run.dump()
    );
}

/// What a tree holds, for comparing a source tree with what a tarball of it unpacked to.
#[derive(Debug, PartialEq)]
enum Node {
    File { bytes: Vec<u8>, executable: bool },
    Link(std::path::PathBuf),
    Dir,
}

fn tree(root: &Path) -> std::collections::BTreeMap<String, Node> {
    use std::os::unix::fs::PermissionsExt;
    let mut found = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            if rel == ".git" {
                continue;
            }
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let node = if meta.file_type().is_symlink() {
                Node::Link(std::fs::read_link(&path).unwrap())
            } else if meta.is_dir() {
                stack.push(path.clone());
                Node::Dir
            } else {
                Node::File {
                    bytes: std::fs::read(&path).unwrap(),
                    executable: meta.permissions().mode() & 0o100 != 0,
                }
            };
            found.insert(rel, node);
        }
    }
    found
}

fn run_ok(command: &mut Command) -> Vec<u8> {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn tarballs_as_ci_makes_them_unpack_byte_for_byte() {
    let _module = crate::util::module_turn(module_path!());
    // A source tree with what real builds have: long and UTF-8 names, links, an
    // executable, a large sparse file, and names past ustar's limits.
    let src = tempfile::tempdir().unwrap();
    let s = src.path();
    let long_dir = format!("vendor/{}", "long-directory-name-".repeat(7));
    std::fs::create_dir_all(s.join(&long_dir)).unwrap();
    std::fs::write(
        s.join(&long_dir).join(format!("{}.php", "file".repeat(30))),
        "<?php // far down\n",
    )
    .unwrap();
    std::fs::create_dir_all(s.join("bin")).unwrap();
    std::fs::write(s.join("bin/console"), "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(
        s.join("bin/console"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(s.join("Ünïcödé.txt"), "héllo\n").unwrap();
    std::os::unix::fs::symlink("bin/console", s.join("console-link")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", s.join("hostname-link")).unwrap();
    // Sparse: 8 MiB with data at two places only.
    let sparse = std::fs::File::create(s.join("data.sparse")).unwrap();
    sparse.set_len(8 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"start", 0).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, &[9u8; 70_000], 5 << 20).unwrap();
    drop(sparse);
    let expected = tree(s);

    let git = |args: &[&str]| {
        run_ok(
            Command::new("git")
                .args([
                    "-c",
                    "user.name=amibake",
                    "-c",
                    "user.email=ci@amibake.invalid",
                ])
                .args(args)
                .current_dir(s),
        )
    };
    git(&["init", "-q"]);
    git(&["add", "-A"]);
    git(&["commit", "-q", "-m", "build"]);

    let gnu_tar = |format: &str| {
        run_ok(
            Command::new("tar")
                .args(["--sparse", &format!("--format={format}"), "-cf", "-", "-C"])
                .arg(s)
                .args(["--exclude=.git", "."]),
        )
    };
    let python = |format: &str| {
        run_ok(Command::new("python3").args([
            "-c",
            &format!(
                "import sys, tarfile\n\
                 with tarfile.open(fileobj=sys.stdout.buffer, mode='w|', format=tarfile.{format}) as t:\n\
                 \x20   t.add(sys.argv[1], arcname='.', filter=lambda i: None if i.name.startswith('./.git') else i)"
            ),
            &s.display().to_string(),
        ]))
    };
    let flavours: Vec<(&str, Vec<u8>)> = vec![
        ("git archive", git(&["archive", "--format=tar", "HEAD"])),
        (
            "git archive | gzip",
            git(&["archive", "--format=tar.gz", "HEAD"]),
        ),
        ("GNU tar, gnu format", gnu_tar("gnu")),
        ("GNU tar, posix format", gnu_tar("posix")),
        ("GNU tar, oldgnu format", gnu_tar("oldgnu")),
        (
            "bsdtar",
            run_ok(
                Command::new("bsdtar")
                    .args(["--exclude", ".git", "-cf", "-", "-C"])
                    .arg(s)
                    .arg("."),
            ),
        ),
        ("Python tarfile, PAX", python("PAX_FORMAT")),
        ("Python tarfile, GNU", python("GNU_FORMAT")),
    ];
    for (flavour, bytes) in flavours {
        let image = Image::new();
        let run = extract(&image, "/srv/app", None, &as_checked(&bytes));
        run.expect_code(0);
        let got = tree(&image.root().join("srv/app"));
        assert_eq!(got, expected, "{flavour}");
    }

    // ustar cannot hold the long name: GNU tar refuses to write it, so the rest is checked.
    let short = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(short.path().join("a/b")).unwrap();
    std::fs::write(short.path().join("a/b/c.txt"), "ustar\n").unwrap();
    let bytes = run_ok(
        Command::new("tar")
            .args(["--format=ustar", "-cf", "-", "-C"])
            .arg(short.path())
            .arg("."),
    );
    let image = Image::new();
    extract(&image, "/srv/app", None, &bytes).expect_code(0);
    assert_eq!(
        tree(&image.root().join("srv/app")),
        tree(short.path()),
        "ustar"
    );
}

/// The tarball's check before any AWS call (`amibake internal-check-tarball`, through its
/// parent side): writes `bytes` as `name` and checks it, keeping at most `most` bytes of
/// its tar stream. Answers the digest and the tar stream kept.
async fn check_keeping(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    most: u64,
) -> Result<(String, Vec<u8>), ExtractError> {
    let empty = dir.join("empty");
    let _ = std::fs::create_dir(&empty);
    let file = dir.join(name);
    std::fs::write(&file, bytes).unwrap();
    let kept = dir.join(format!("{name}.kept"));
    let _ = std::fs::remove_file(&kept);
    let digest = check_tarball(
        Path::new(env!("CARGO_BIN_EXE_amibake")),
        &empty,
        &Tarball::File(file),
        &kept,
        most,
        crate::util::isolation(),
        &CancellationToken::new(),
    )
    .await?;
    Ok((digest, std::fs::read(&kept).unwrap()))
}

async fn check(dir: &Path, name: &str, bytes: &[u8]) -> Result<(String, Vec<u8>), ExtractError> {
    check_keeping(dir, name, bytes, u64::MAX).await
}

/// The tar stream the check keeps of `bytes`: what a bake's extraction reads.
fn as_checked(bytes: &[u8]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let checked = runtime.block_on(check(dir.path(), "given", bytes));
    checked.unwrap_or_else(|e| panic!("the check: {e}")).1
}

#[tokio::test]
async fn the_check_refuses_what_the_tarball_alone_shows_and_keeps_the_rest_inflated() {
    let _module = crate::util::module_turn(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let canary = Canary::new();
    let (tar_bytes, files) = composer_like();

    // A good tarball, however compressed, is inflated once, by the check: it keeps the tar
    // stream, which the extraction places byte for byte; the digest is of the bytes given.
    for (name, bytes) in [
        ("plain.tar", tar_bytes.clone()),
        ("app.tar.gz", gzip(&tar_bytes)),
        (
            "app.tar.zst",
            zstd::encode_all(tar_bytes.as_slice(), 3).unwrap(),
        ),
    ] {
        let (digest, kept) = check(dir.path(), name, &bytes)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            digest,
            format!("{:x}", sha2::Sha256::digest(&bytes)),
            "{name}"
        );
        let (end, padding) = tar_bytes.split_at(kept.len().min(tar_bytes.len()));
        assert!(
            end == kept.as_slice() && padding.iter().all(|&b| b == 0),
            "{name}: {} bytes kept of a tar stream of {}: all of it to the archive's end",
            kept.len(),
            tar_bytes.len()
        );
        let image = Image::new();
        let stream = dir.path().join(format!("{name}.kept"));
        extract_into_image(
            Path::new(env!("CARGO_BIN_EXE_amibake")),
            image.root(),
            &spec("/srv/www/app"),
            &stream,
            crate::util::isolation(),
            |_, _| {},
            &CancellationToken::new(),
        )
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_composer_like_at(&image.root().join("srv/www/app"), &files, 0);
    }

    // What the tarball alone shows is wrong: refused, the entry named as the extraction
    // names it, on one line.
    for (name, bytes, refused_with) in refused_on_their_own() {
        let err = check(dir.path(), name, &bytes).await.expect_err(name);
        let said = err.to_string();
        assert!(
            matches!(err, ExtractError::Refused(_))
                && said.starts_with(refused_with)
                && !said.contains('\n')
                && !said.contains('\x1b'),
            "{name}: wanted one line starting {refused_with:?}, got {err:?}"
        );
    }

    // What only the image can tell is the extraction's to refuse: the check passes it.
    let through_a_symlink = tarball(|b| {
        append_raw(
            b,
            EntryType::Symlink,
            "out",
            Some(&canary.path().display().to_string()),
            b"",
        );
        append_raw(b, EntryType::Regular, "out/pwned", None, b"pwned");
    });
    check(dir.path(), "symlink-out.tar", &through_a_symlink)
        .await
        .unwrap();
    canary.assert_untouched("checked, not extracted");

    let err = check_tarball(
        Path::new(env!("CARGO_BIN_EXE_amibake")),
        &dir.path().join("empty"),
        &Tarball::File(dir.path().join("missing.tar")),
        &dir.path().join("missing.kept"),
        u64::MAX,
        crate::util::isolation(),
        &CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, ExtractError::Read { .. }) && err.to_string().contains("missing.tar"),
        "{err}"
    );
}

/// A tarball that inflates without end (a gzip bomb: 64 MiB of zeros in a few dozen KiB)
/// must not fill the disk the run works on: the check keeps the tar stream only up to its
/// bound, and says so.
#[tokio::test]
async fn a_tarball_that_inflates_past_the_room_for_its_stream_is_stopped_there() {
    let _module = crate::util::module_turn(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let bomb = gzip(&tarball(|b| {
        append_raw(b, EntryType::Regular, "zeros", None, &vec![0u8; 64 << 20])
    }));
    assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
    let most = 4 << 20;
    let Err(err) = check_keeping(dir.path(), "bomb.tar.gz", &bomb, most).await else {
        panic!("a tarball inflating past {most} bytes kept whole");
    };
    assert!(
        matches!(err, ExtractError::Child(_))
            && err
                .to_string()
                .contains(&format!("inflates past {most} bytes")),
        "{err:?}"
    );
    let kept = std::fs::metadata(dir.path().join("bomb.tar.gz.kept")).unwrap();
    assert!(kept.len() <= most, "{} bytes kept", kept.len());

    // The same tarball with room for it passes.
    let (_, kept) = check_keeping(dir.path(), "bomb.tar.gz", &bomb, 65 << 20)
        .await
        .unwrap();
    assert!(kept.len() > 64 << 20);
}
