//! The sandbox's walls, attacked through whole bakes on the local cloud, on both backends:
//! a program from the tarball, run by a provisioner in an operator's terminal, on a base
//! image that holds a device node naming a host disk, with no network and with the
//! outside (`network = true`), tries every way out it knows; the
//! image it leaves behind still has the owners, modes and package database a provisioner
//! gave it. Then bases and pre commands that would hang, flood or swap a bake.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::localcloud::{LocalCloud, PARTITION_1_OFFSET};
use crate::util::tarballs::{gzip, tarball, Canary};
use crate::util::{tag, Story};
use sha2::Digest;
use tar::EntryType;

/// The program a provisioner runs from the tarball. Each way out it tries prints `held …`
/// or `CROSSED …`; any crossing fails the bake. It then names itself `amibake-probe` and
/// lingers, so the test can look at it from the host.
const ATTACK: &str = r#"#!/usr/bin/perl
use strict;
use warnings;
use POSIX ();
use Socket;
my $crossed = 0;
sub verdict {
    my ($what, $ok) = @_;
    if ($ok) { print "CROSSED $what\n"; $crossed = 1 } else { print "held $what: $!\n" }
}
# The operator's terminal: open it, and push a command into it (TIOCSTI) through it and
# through every descriptor held.
my $push = "touch $ENV{ESCAPED}\n";
sub push_into {
    my ($fh) = @_;
    for my $c (split //, $push) { return 0 unless ioctl($fh, 0x5412, $c) }
    return 1;
}
if (open(my $tty, '+<', '/dev/tty')) {
    verdict("open /dev/tty", 1);
    verdict("TIOCSTI into /dev/tty", push_into($tty));
} else {
    verdict("open /dev/tty", 0);
}
opendir(my $fds, "/proc/self/fd") or die "no /proc/self/fd: $!";
for my $fd (grep { /^\d+$/ } readdir($fds)) {
    open(my $fh, "+<&=", $fd) or next;
    verdict("a terminal on descriptor $fd", -t $fh);
    verdict("TIOCSTI on descriptor $fd", push_into($fh));
}
# A terminal of its own, made its controlling terminal in a session of its own, where the
# kernel allows TIOCSTI: seccomp still refuses it.
pipe(my $verdict_in, my $verdict_out) or die;
my $child = fork() // die "fork: $!";
if ($child == 0) {
    close($verdict_in);
    POSIX::setsid() or die "setsid: $!";
    open(my $master, '+<', '/dev/ptmx') or die "ptmx: $!";
    my $unlock = pack("i", 0);
    ioctl($master, 0x40045431, $unlock) or die "unlockpt: $!";
    my $number = pack("i", 0);
    ioctl($master, 0x80045430, $number) or die "ptsname: $!";
    open(my $own, '+<', "/dev/pts/" . unpack("i", $number)) or die "pts: $!";
    my $x = "x";
    my $pushed = ioctl($own, 0x5412, $x) ? 1 : 0;
    syswrite($verdict_out, "$pushed $!\n");
    POSIX::_exit(0);
}
close($verdict_out);
my ($pushed, $why) = split(/ /, scalar(<$verdict_in>) // "0 no answer", 2);
waitpid($child, 0);
chomp($why);
$! = 0;
if ($pushed) { print "CROSSED TIOCSTI into a terminal of its own\n"; $crossed = 1 }
else { print "held TIOCSTI into a terminal of its own: $why\n" }
# Escape sequences meant for the terminal: a title, a colour.
print "title \e]0;amibake-title\a \e[31mred\e[0m\n";
# The kernel keyring, which seccomp denies.
my ($type, $description, $payload) = ("user", "amibake-probe", "x");
verdict("add_key", syscall(248, $type, $description, $payload, 1, -3) >= 0);
# A host loopback listener and a host abstract unix socket.
socket(my $tcp, PF_INET, SOCK_STREAM, 0) or die;
verdict("connect to host 127.0.0.1:$ENV{PORT}", connect($tcp, sockaddr_in($ENV{PORT}, inet_aton("127.0.0.1"))));
socket(my $unix, PF_UNIX, SOCK_STREAM, 0) or die;
verdict("connect to host abstract socket", connect($unix, pack_sockaddr_un("\0$ENV{ABSTRACT}")));
# The host's sockets, read through the /proc entry of any process here (pasta lives in the
# host's network namespace).
my $seen = 0;
for my $table (glob("/proc/[0-9]*/net/unix /proc/[0-9]*/task/[0-9]*/net/unix")) {
    open(my $f, '<', $table) or next;
    local $/;
    my $text = <$f>;
    $seen = 1 if index($text, "\@$ENV{ABSTRACT}") >= 0;
}
verdict("see the host's abstract socket through /proc", $seen);
# With the outside: the host port it names answers, a name resolves through the host's
# resolver (on the host's loopback), and the metadata service is refused though its port
# is named. A failure here is the network missing, which fails the bake too.
if ($ENV{NAMED_PORT}) {
    socket(my $named, PF_INET, SOCK_STREAM, 0) or die;
    connect($named, sockaddr_in($ENV{NAMED_PORT}, inet_aton("127.0.0.1"))) or die "no named port: $!";
    my $greeting = <$named> // "";
    print "the named host port said: $greeting";
    my $address = gethostbyname("probe.test") or die "probe.test does not resolve";
    print "probe.test is ", inet_ntoa($address), "\n";
    socket(my $imds, PF_INET, SOCK_STREAM, 0) or die;
    verdict("connect to the metadata service", connect($imds, sockaddr_in($ENV{IMDS_PORT}, inet_aton("127.0.0.1"))));
}
# A device node the base image holds, naming a host loop device.
if (-e "/opt/d") {
    my $dev;
    verdict("open /opt/d", open($dev, '+<', '/opt/d') && print {$dev} "PWNED");
} else {
    print "CROSSED nothing: the base has no /opt/d\n";
    $crossed = 1;
}
# A host file.
verdict("write the host canary", open(my $c, '>', "$ENV{CANARY}/pwned"));
$0 = "amibake-probe";
sleep 2;
exit $crossed;
"#;

/// What a package-installing provisioner does to an image: files of root and of another
/// user (through chown, setpriv and su inside), a mode, dpkg's database.
const OWNERS: [&str; 9] = [
    "set -e; touch /srv/by-root; chmod 0640 /srv/by-root",
    "mkdir -p /srv/owned && chown www-data:www-data /srv/owned",
    "setpriv --reuid=33 --regid=33 --clear-groups touch /srv/owned/by-setpriv",
    "su -s /bin/sh -c 'touch /srv/owned/by-su' www-data",
    "mkdir -p /tmp/pkg/DEBIAN /tmp/pkg/usr/share/amibake-probe",
    "printf 'Package: amibake-probe\\nVersion: 1.0\\nArchitecture: all\\nMaintainer: amibake <amibake@example.invalid>\\nDescription: probe\\n' > /tmp/pkg/DEBIAN/control",
    "echo probe > /tmp/pkg/usr/share/amibake-probe/README",
    "dpkg-deb --root-owner-group --build /tmp/pkg /tmp/probe.deb",
    "dpkg -i /tmp/probe.deb",
];

fn quoted(commands: &[&str]) -> String {
    commands
        .iter()
        .map(|c| serde_json::to_string(c).unwrap())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The app: the attack program and a setuid helper (kept: `keep_setuid = true`).
fn app_tarball() -> Vec<u8> {
    gzip(&tarball(|b| {
        for (name, mode, data) in [
            ("bin/attack", 0o755, ATTACK.as_bytes()),
            ("bin/helper", 0o4755, b"#!/bin/sh\n".as_slice()),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(EntryType::Regular);
            h.set_size(data.len() as u64);
            h.set_mode(mode);
            h.set_uid(1000);
            h.set_gid(1000);
            h.set_mtime(1_700_000_000);
            b.append_data(&mut h, name, data).unwrap();
        }
    }))
}

/// A host loop device over a file of `ORIGINAL`s: the disk a device node may name.
struct HostDisk {
    file: tempfile::NamedTempFile,
    device: String,
}

impl HostDisk {
    fn new() -> HostDisk {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "ORIGINAL".repeat(1 << 16)).unwrap();
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file.path())
            .output()
            .unwrap();
        assert!(out.status.success());
        let device = String::from_utf8(out.stdout).unwrap().trim().to_string();
        HostDisk { file, device }
    }

    fn numbers(&self) -> (u32, u32) {
        let rdev = std::fs::metadata(&self.device).unwrap().rdev();
        (rustix::fs::major(rdev), rustix::fs::minor(rdev))
    }

    fn assert_unchanged(&self) {
        let bytes = std::fs::read(self.file.path()).unwrap();
        assert!(
            bytes == "ORIGINAL".repeat(1 << 16).as_bytes(),
            "the host disk behind {} was written",
            self.device
        );
    }
}

impl Drop for HostDisk {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

/// Opens a pseudo-terminal: (the side the test reads, the side the "operator's shell" has).
fn pty() -> (OwnedFd, OwnedFd) {
    let (mut master, mut slave) = (0, 0);
    let size = libc::winsize {
        ws_row: 50,
        ws_col: 200,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: valid out-pointers and a valid winsize.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: openpty returned two descriptors that are ours.
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

/// What an operator's terminal showed while a shell ran `script` in it, the terminal its
/// controlling terminal, as an interactive shell's is.
fn in_a_terminal(cloud: &LocalCloud, dir: &Path, script: &str) -> Vec<u8> {
    let (master, slave) = pty();
    let mut shell = Command::new("bash");
    shell
        .args(["--noprofile", "--norc", "-c", script])
        .current_dir(dir)
        .env("AMIBAKE", env!("CARGO_BIN_EXE_amibake"))
        .env("TMPDIR", dir)
        .envs(cloud.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave.try_clone().unwrap());
    // SAFETY: setsid and ioctl are async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut shell, || {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = shell.spawn().unwrap();
    // The terminal's last holders here: the shell and what it starts are its only users.
    drop(shell);
    drop(slave);
    let mut screen = Vec::new();
    let mut reader = std::fs::File::from(master);
    // Until the shell and everything holding the terminal has gone (EIO).
    let _ = reader.read_to_end(&mut screen);
    assert!(child.wait().unwrap().success());
    screen
}

/// A DNS resolver on the host's loopback, as systemd-resolved's is: every A question is
/// answered 127.0.0.9. Outside the local cloud's addresses (127.0-249.*).
struct HostResolver {
    address: std::net::Ipv4Addr,
}

impl HostResolver {
    fn start() -> HostResolver {
        let address = std::net::Ipv4Addr::new(127, 250, 0, 53);
        let socket = std::net::UdpSocket::bind((address, 53)).unwrap();
        std::thread::spawn(move || {
            let mut query = [0u8; 512];
            while let Ok((len, peer)) = socket.recv_from(&mut query) {
                // The header (the question's id; a response, recursion available; one
                // question, one answer), the question as asked, and an A record naming it.
                let mut end = 12;
                while end < len && query[end] != 0 {
                    end += usize::from(query[end]) + 1;
                }
                let Some(question) = query.get(12..end + 5) else {
                    continue;
                };
                let mut answer = query[..2].to_vec();
                answer.extend([0x85, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]);
                answer.extend(question);
                answer.extend([0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 9]);
                let _ = socket.send_to(&answer, peer);
            }
        });
        HostResolver { address }
    }
}

/// Host uids of the processes named `amibake-probe` seen until `stop` is set.
fn watch_probes(stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Vec<u32> {
    let mut uids = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            if comm.trim() != "amibake-probe" {
                continue;
            }
            let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
            if let Some(uid) = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().next())
                .and_then(|uid| uid.parse().ok())
            {
                uids.push(uid);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    uids
}

fn stat(root: &Path, path: &str) -> (u32, u32, u32) {
    let m = std::fs::symlink_metadata(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

#[test]
fn a_tarball_program_in_an_operators_terminal_reaches_nothing_of_the_host() {
    let _module = crate::util::module_turn(module_path!());
    let story = Story::new("none");
    let (cloud, runtime, clients, dir) =
        (&story.cloud, &story.runtime, &story.clients, story.dir());
    let disk = HostDisk::new();
    let (major, minor) = disk.numbers();
    let base = runtime.block_on(cloud.edited_base(clients, "device-node-base", |root| {
        let node = root.join("opt/d");
        let made = Command::new("mknod")
            .arg(&node)
            .args(["b", &major.to_string(), &minor.to_string()])
            .status()
            .unwrap();
        assert!(made.success());
    }));
    std::fs::write(dir.join("app.tar.gz"), app_tarball()).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let abstract_name = format!("amibake-test-{}", std::process::id());
    let unix = std::os::unix::net::UnixListener::bind_addr(
        &std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes()).unwrap(),
    )
    .unwrap();
    unix.set_nonblocking(true).unwrap();
    let canary = Canary::new();
    let escaped = dir.join("ESCAPED");
    let env = format!(
        "PORT = \"{port}\", ABSTRACT = \"{abstract_name}\", ESCAPED = \"{}\", CANARY = \"{}\"",
        escaped.display(),
        canary.path().display()
    );
    // What the outside offers: a host port the template names, which greets, and a resolver
    // on the host's loopback, as systemd-resolved's would be; the bakes see it as the host's
    // resolv.conf, bound over it in a mount namespace of their own.
    let named = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let named_port = named.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut connection in named.incoming().flatten() {
            let _ = std::io::Write::write_all(&mut connection, b"amibake-hello\n");
        }
    });
    let resolver = HostResolver::start();
    std::fs::write(
        dir.join("resolv.conf"),
        format!("nameserver {}\n", resolver.address),
    )
    .unwrap();
    let imds_port = cloud
        .env
        .iter()
        .find(|(k, _)| k == "AWS_EC2_METADATA_SERVICE_ENDPOINT")
        .and_then(|(_, url)| {
            url.rsplit(':')
                .next()?
                .trim_end_matches('/')
                .parse::<u16>()
                .ok()
        })
        .unwrap();
    std::fs::write(
        dir.join("attack.toml"),
        format!(
            "[bake]\nname = \"attack-${{commit}}-${{timestamp}}\"\nbase_ami = \"{base}\"\ndest = \"/srv/app\"\n\
             keep_setuid = true\n\n\
             [[bake.provisioner]]\nname = \"attack\"\ninline = [\"/srv/app/bin/attack\"]\nenv = {{ {env} }}\n\n\
             [[bake.provisioner]]\nname = \"attack with network\"\ninline = [\"/srv/app/bin/attack\"]\n\
             network = true\nhost_ports = [{named_port}, {imds_port}]\n\
             env = {{ {env}, NAMED_PORT = \"{named_port}\", IMDS_PORT = \"{imds_port}\" }}\n\n\
             [[bake.provisioner]]\nname = \"owners\"\ninline = [{}]\n",
            quoted(&OWNERS)
        ),
    )
    .unwrap();

    for backend in ["attach", "direct"] {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = std::thread::spawn({
            let stop = stop.clone();
            move || watch_probes(stop)
        });
        // The bake, given the terminal on descriptor 3 as well (as a careless wrapper
        // script might), then what an operator's shell would do next: read a line from its
        // terminal and run it. A command pushed into the terminal would run there.
        let screen = in_a_terminal(
            cloud,
            dir,
            &format!(
                "exec 3<>/dev/tty; unshare --mount --propagation private -- sh -c \
                 'mount --bind resolv.conf /etc/resolv.conf && exec \"$@\"' sh \
                 \"$AMIBAKE\" bake attack.toml --tarball app.tar.gz --commit c0ffee1 \
                 --backend {backend} --force --manifest {backend}.json; echo \"bake-exit=$?\"\n\
                 if read -t 2 -r line; then eval \"$line\"; fi; echo terminal-done"
            ),
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let uids = watcher.join().unwrap();
        let shown = String::from_utf8_lossy(&screen);
        assert!(shown.contains("bake-exit=0"), "{backend}: {shown}");
        assert!(shown.contains("terminal-done"), "{backend}: {shown}");
        assert!(
            !escaped.exists(),
            "{backend}: a pushed command ran: {shown}"
        );
        // Each wall holds for both attacks: without a network and with the outside.
        for held in [
            "held open /dev/tty: No such device or address",
            "held TIOCSTI on descriptor 0",
            "held TIOCSTI on descriptor 1",
            "held add_key: Operation not permitted",
            "held TIOCSTI into a terminal of its own: Operation not permitted",
            &format!("held connect to host 127.0.0.1:{port}"),
            "held connect to host abstract socket",
            "held see the host's abstract socket through /proc",
            "held open /opt/d: Permission denied",
            "held write the host canary",
        ] {
            assert_eq!(
                shown.matches(held).count(),
                2,
                "{backend}: not twice `{held}`: {shown}"
            );
        }
        for reached in [
            "the named host port said: amibake-hello",
            "probe.test is 127.0.0.9",
            "held connect to the metadata service: Operation not permitted",
        ] {
            assert!(
                shown.contains(reached),
                "{backend}: not `{reached}`: {shown}"
            );
        }
        // The program's escape sequences reach the terminal only escaped.
        assert!(
            !shown.contains("\u{1b}]0;amibake-title") && !shown.contains("\u{1b}[31mred"),
            "{backend}: raw escape sequences reached the terminal"
        );
        assert!(shown.contains("\\u{1b}]0;amibake-title\\u{7}"), "{shown}");
        assert!(
            !uids.is_empty(),
            "{backend}: the provisioner was never seen from the host"
        );
        assert!(
            uids.iter().all(|&uid| uid >= 0x8_0000),
            "{backend}: the provisioner ran as host uid {uids:?}"
        );
        assert!(
            listener.accept().is_err(),
            "{backend}: the listener was reached"
        );
        assert!(
            unix.accept().is_err(),
            "{backend}: the abstract socket was reached"
        );
        disk.assert_unchanged();
        canary.assert_untouched(backend);

        // The image: owners and modes as the provisioners and the tarball gave them, read
        // from the exported snapshot.
        let m: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("{backend}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(m["sandbox"], "private", "{m}");
        let snapshot = m["snapshot_id"].as_str().unwrap();
        let image = cloud.mount_snapshot(snapshot, dir, PARTITION_1_OFFSET);
        let root = &image.root;
        assert_eq!(stat(root, "srv/by-root"), (0, 0, 0o640));
        assert_eq!(stat(root, "srv/owned").0, 33);
        assert_eq!(stat(root, "srv/owned/by-setpriv"), (33, 33, 0o644));
        assert_eq!(stat(root, "srv/owned/by-su").0, 33);
        assert_eq!(stat(root, "srv/app/bin/attack"), (0, 0, 0o755));
        assert_eq!(stat(root, "srv/app/bin/helper"), (0, 0, 0o4755));
        assert_eq!(stat(root, "usr/share/amibake-probe/README"), (0, 0, 0o644));
        let status = std::fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap();
        assert!(status.contains("Package: amibake-probe\nStatus: install ok installed"));
        assert!(
            std::fs::symlink_metadata(root.join("opt/d"))
                .unwrap()
                .file_type()
                .is_block_device(),
            "the base's node is still there, only powerless"
        );
        drop(image);
        cloud.assert_nothing_temporary();
    }
}

/// The tags of the image `ami`.
fn image_tags(
    runtime: &tokio::runtime::Runtime,
    clients: &amibake::aws::Clients,
    ami: &str,
) -> Vec<aws_sdk_ec2::types::Tag> {
    runtime
        .block_on(clients.ec2.describe_images().image_ids(ami).send())
        .unwrap()
        .images()[0]
        .tags()
        .to_vec()
}

/// Runs a bake to its end, or stops it after `limit` (SIGTERM, so it cleans up, then
/// SIGKILL) and fails: a hang is a failure too.
fn bake_within(
    cloud: &LocalCloud,
    dir: &Path,
    template: &str,
    limit: Duration,
) -> crate::util::Run {
    let mut child = cloud
        .amibake(dir)
        .env("TMPDIR", dir)
        .args(crate::util::bake_args(template, "c0ffee1", &[]))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            let grace = Instant::now() + Duration::from_secs(60);
            while child.try_wait().unwrap().is_none() && Instant::now() < grace {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
            panic!("amibake bake {template} hung for {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    crate::util::Run {
        command: format!("amibake bake {template}"),
        output: child.wait_with_output().unwrap(),
    }
}

#[test]
fn a_base_or_a_pre_command_cannot_hang_flood_or_swap_a_bake() {
    let _module = crate::util::module_turn(module_path!());
    let story = Story::new("none");
    let (cloud, runtime, clients, dir) =
        (&story.cloud, &story.runtime, &story.clients, story.dir());
    let original = gzip(&tarball(|b| {
        crate::util::tarballs::append_raw(b, EntryType::Regular, "VERSION", None, b"checked\n")
    }));
    let swapped = gzip(&tarball(|b| {
        crate::util::tarballs::append_raw(b, EntryType::Regular, "VERSION", None, b"swapped\n")
    }));
    std::fs::write(dir.join("app.tar.gz"), &original).unwrap();
    std::fs::write(dir.join("swapped.tar.gz"), &swapped).unwrap();
    let template = |name: &str, base: &str, extra: &str| {
        std::fs::write(
            dir.join(format!("{name}.toml")),
            format!(
                "[bake]\nname = \"{name}-${{commit}}-${{timestamp}}\"\nbase_ami = \"{base}\"\n\
                 dest = \"/srv/app\"\n{extra}"
            ),
        )
        .unwrap();
    };

    // A pre command that rewrites the tarball in place after its check: the image holds the
    // bytes that were checked, and the tag is their digest.
    let debian = "resolve:ssm:/aws/service/debian/release/12/latest/amd64";
    template(
        "swap",
        debian,
        "\n[[bake.pre]]\ncommand = [\"sh\", \"-c\", \"cat swapped.tar.gz > app.tar.gz\"]\n",
    );
    let run = bake_within(cloud, dir, "swap.toml", Duration::from_secs(120));
    run.expect_code(0);
    let m: serde_json::Value = run.json();
    let checked_sha = format!("{:x}", sha2::Sha256::digest(&original));
    assert_eq!(m["tarball_sha256"], checked_sha.as_str());
    assert_eq!(std::fs::read(dir.join("app.tar.gz")).unwrap(), swapped);
    let image = cloud.mount_snapshot(m["snapshot_id"].as_str().unwrap(), dir, PARTITION_1_OFFSET);
    assert_eq!(
        std::fs::read_to_string(image.root.join("srv/app/VERSION")).unwrap(),
        "checked\n"
    );
    drop(image);
    let tags = image_tags(runtime, clients, m["ami_id"].as_str().unwrap());
    assert_eq!(
        tag(&tags, "amibake:tarball-sha256"),
        Some(checked_sha.as_str())
    );
    assert_eq!(tag(&tags, "amibake:sandbox"), Some("private"));

    // The opt-in for kernels before 5.12, by flag over the template: said, and recorded in
    // the manifest, the summary and the tags.
    template("compat", debian, "");
    let run = crate::util::Run {
        command: "amibake bake compat.toml --sandbox compat".into(),
        output: cloud
            .amibake(dir)
            .env("TMPDIR", dir)
            .args([
                "bake",
                "compat.toml",
                "--tarball",
                "app.tar.gz",
                "--commit",
                "c0ffee2",
            ])
            .args(["--sandbox", "compat"])
            .output()
            .unwrap(),
    };
    run.expect_code(0);
    let m: serde_json::Value = run.json();
    assert_eq!(m["sandbox"], "compat", "{}", run.dump());
    assert!(
        run.stderr()
            .contains("sandbox compat: root in the image is root on this host"),
        "{}",
        run.dump()
    );
    let tags = image_tags(runtime, clients, m["ami_id"].as_str().unwrap());
    assert_eq!(tag(&tags, "amibake:sandbox"), Some("compat"));
    // A private run of the same inputs does not take the compat image for its own.
    let run = bake_within(cloud, dir, "compat.toml", Duration::from_secs(120));
    run.expect_code(0);
    let private: serde_json::Value = run.json();
    assert_eq!(private["reused"], false, "{}", run.dump());
    assert_ne!(private["fingerprint"], m["fingerprint"]);

    // Bases whose files the host side reads would hang the bake or fill its memory.
    let fifo = runtime.block_on(cloud.edited_base(clients, "fifo-passwd", |root| {
        std::fs::remove_file(root.join("etc/passwd")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("etc/passwd"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
    }));
    let zero = runtime.block_on(cloud.edited_base(clients, "zero-passwd", |root| {
        std::fs::remove_file(root.join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", root.join("etc/passwd")).unwrap();
        let _ = std::fs::remove_file(root.join("dev/zero"));
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("dev/zero"),
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o666),
            rustix::fs::makedev(1, 5),
        )
        .unwrap();
    }));
    let huge = runtime.block_on(cloud.edited_base(clients, "huge-resolv", |root| {
        let path = root.join("etc/resolv.conf");
        let _ = std::fs::remove_file(&path);
        std::fs::File::create(&path)
            .unwrap()
            .set_len(2 << 30)
            .unwrap();
    }));
    for (name, base, owner, said) in [
        (
            "fifo",
            &fifo,
            true,
            "/etc/passwd: is a FIFO, not a regular file",
        ),
        ("zero", &zero, true, "/etc/passwd"),
        (
            "huge",
            &huge,
            false,
            "etc/resolv.conf: is larger than the 1048576 bytes amibake reads of such a file",
        ),
    ] {
        template(
            name,
            base,
            if owner { "owner = \"www-data\"\n" } else { "" },
        );
        let run = bake_within(
            cloud,
            dir,
            &format!("{name}.toml"),
            Duration::from_secs(120),
        );
        run.expect_code(1);
        assert!(run.stderr().contains(said), "{name}: {}", run.dump());
        cloud.assert_nothing_temporary();
    }
}
