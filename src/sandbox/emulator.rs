//! Running the programs of an image built for another architecture (an arm64 image on an
//! x86_64 host, the other way round): through qemu's user-mode emulator, registered with
//! binfmt_misc inside the sandbox's own user namespace. Linux 6.7 on gives each user
//! namespace a binfmt_misc of its own, so the host's registrations are neither needed nor
//! touched, and the registration ends with the sandbox: nothing to undo, nothing left.
//!
//! The interpreter is registered with the `F` flag: the kernel opens it at registration,
//! from the host's tree, and the image never needs a copy of it.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use rustix::mount::MountFlags;

use super::Isolation;

/// Where a sandbox's processes look for their binfmt_misc, and where it is mounted.
const BINFMT_MISC: &str = "/proc/sys/fs/binfmt_misc";

/// An architecture amibake can emulate: its name at AWS, qemu's name for it, and how its
/// ELF programs are recognised (qemu's own magic and mask, as its binfmt configuration has
/// them).
struct Foreign {
    aws: &'static str,
    qemu: &'static str,
    magic: &'static [u8; 20],
    mask: &'static [u8; 20],
}

const ARCHITECTURES: [Foreign; 2] = [
    Foreign {
        aws: "arm64",
        qemu: "aarch64",
        magic: b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00",
        mask: b"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff",
    },
    Foreign {
        aws: "x86_64",
        qemu: "x86_64",
        magic: b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x3e\x00",
        mask: b"\xff\xff\xff\xff\xff\xfe\xfe\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff",
    },
];

/// This host's architecture, as AWS names it.
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "arm64",
        other => other,
    }
}

/// How an image's programs run on this host, when it is of another architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emulator {
    /// The image's architecture, as AWS names it.
    pub architecture: String,
    /// qemu's user-mode emulator for it, on this host.
    pub interpreter: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    #[error("the base image is {image} and this host is {host}: its programs run here through qemu's user-mode emulator, and `{binary}` is in no absolute directory of PATH: install the `qemu-user-static` package (Debian, Ubuntu, Fedora)")]
    Missing {
        image: String,
        host: &'static str,
        binary: String,
    },
    /// An emulator that would run every program of the image, and that another user than
    /// root could have changed, or that needs libraries the image does not hold.
    #[error("the base image is {image}: {path} would run its programs, but {why}")]
    Unfit {
        image: String,
        path: String,
        #[source]
        why: Unfitness,
    },
    #[error("the base image is {image}: this {host} host cannot run its programs (amibake emulates arm64 and x86_64)")]
    Unsupported { image: String, host: &'static str },
    #[error("the base image is {image} and this host is {host}: its programs run here through a binfmt_misc of the sandbox's own, which Linux {release} lacks (it needs 6.7 or later)")]
    Kernel {
        image: String,
        host: &'static str,
        release: String,
    },
    #[error("the base image is {image} and this host is {host}: its programs run only in the sandbox's own user namespace, which sandbox = \"compat\" does without: leave out `sandbox = \"compat\"` (bake.sandbox) and `--sandbox compat`")]
    Compat { image: String, host: &'static str },
}

/// Why an emulator found on PATH is not one to run an image's programs through.
#[derive(Debug, thiserror::Error)]
pub enum Unfitness {
    #[error("{path} cannot be read: {source}")]
    Unreadable {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is owned by uid {uid} with mode {mode:o}: it must be root's, writable by root alone")]
    Writable { path: String, uid: u32, mode: u32 },
    #[error("{path} is linked dynamically: install the static build (`qemu-user-static`)")]
    Dynamic { path: String },
    #[error("{path} is not a 64-bit program of this host's machine")]
    NotThisMachine { path: String },
}

/// Whether, and how, a sandbox with `isolation` runs the programs of an image of
/// `architecture` on this host: `None` where they run natively. Checked before any AWS call
/// where the template names the architecture, else as soon as the base image is described.
pub fn for_image(
    architecture: &str,
    isolation: Isolation,
) -> Result<Option<Emulator>, EmulatorError> {
    let host = host_architecture();
    if architecture == host {
        return Ok(None);
    }
    let image = architecture.to_string();
    let foreign = find(architecture).ok_or_else(|| EmulatorError::Unsupported {
        image: image.clone(),
        host,
    })?;
    if isolation == Isolation::Compat {
        return Err(EmulatorError::Compat { image, host });
    }
    let release = rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned();
    if !super::ids::kernel_at_least(&release, (6, 7)) {
        return Err(EmulatorError::Kernel {
            image,
            host,
            release,
        });
    }
    let binary = format!("qemu-{}-static", foreign.qemu);
    let found = on_path(&binary).ok_or_else(|| EmulatorError::Missing {
        image: image.clone(),
        host,
        binary,
    })?;
    let interpreter = fit_interpreter(&found).map_err(|why| EmulatorError::Unfit {
        image: image.clone(),
        path: found.display().to_string(),
        why,
    })?;
    Ok(Some(Emulator {
        architecture: image,
        interpreter,
    }))
}

fn find(architecture: &str) -> Option<&'static Foreign> {
    ARCHITECTURES.iter().find(|f| f.aws == architecture)
}

/// The first executable file named `binary` in PATH's absolute directories (a relative one
/// would name another file in each directory the run is started from).
fn on_path(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(binary))
        .find(|candidate| {
            rustix::fs::access(candidate, rustix::fs::Access::EXEC_OK).is_ok()
                && candidate.is_file()
        })
}

/// The emulator's real path, if it is fit to run every program of the image: owned by root
/// and writable by nobody else (whoever could change it could change every image baked
/// through it), and a static program of this host's machine (after `pivot_root`, a dynamic
/// one would look for its libraries in the image).
fn fit_interpreter(found: &Path) -> Result<PathBuf, Unfitness> {
    use std::os::unix::fs::MetadataExt;
    let unreadable = |path: &Path| {
        let path = path.display().to_string();
        move |source| Unfitness::Unreadable { path, source }
    };
    let real = std::fs::canonicalize(found).map_err(unreadable(found))?;
    let path = real.display().to_string();
    let meta = std::fs::metadata(&real).map_err(unreadable(&real))?;
    if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return Err(Unfitness::Writable {
            path,
            uid: meta.uid(),
            mode: meta.mode() & 0o7777,
        });
    }
    // The ELF header and its program headers, which follow it.
    let mut head = Vec::new();
    std::fs::File::open(&real)
        .and_then(|f| std::io::Read::read_to_end(&mut std::io::Read::take(f, 64 << 10), &mut head))
        .map_err(unreadable(&real))?;
    match host_machine().and_then(|machine| elf_needs_interpreter(&head, machine)) {
        Some(false) => Ok(real),
        Some(true) => Err(Unfitness::Dynamic { path }),
        None => Err(Unfitness::NotThisMachine { path }),
    }
}

/// ELF's e_machine of this host's programs, as the magic of its architecture has it.
fn host_machine() -> Option<u16> {
    find(host_architecture()).map(|f| u16::from_le_bytes([f.magic[18], f.magic[19]]))
}

/// Whether the 64-bit little-endian ELF program `elf`, of machine `machine`, asks for a
/// program interpreter (PT_INTERP: it is linked dynamically); `None` when it is not such a
/// program.
fn elf_needs_interpreter(elf: &[u8], machine: u16) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(elf.get(at..at + 8)?.try_into().ok()?));
    // Magic, 64-bit, little-endian; then e_machine.
    if elf.get(..6)? != b"\x7fELF\x02\x01" || u16_at(18)? != machine {
        return None;
    }
    let (phoff, phentsize, phnum) = (u64_at(32)?, u16_at(54)?, u16_at(56)?);
    let mut needs = false;
    for i in 0..usize::from(phnum) {
        let at = usize::try_from(phoff).ok()? + i * usize::from(phentsize);
        needs |= u32_at(at)? == PT_INTERP;
    }
    Some(needs)
}

impl Emulator {
    /// The emulator of `architecture` at `interpreter` (an absolute path), as the internal
    /// command is told.
    pub fn from_args(architecture: &str, interpreter: PathBuf) -> Option<Emulator> {
        (find(architecture).is_some() && interpreter.is_absolute()).then(|| Emulator {
            architecture: architecture.to_string(),
            interpreter,
        })
    }

    /// Opens the interpreter while the host's tree is still in view (before `pivot_root`).
    pub fn open(&self) -> std::io::Result<OwnedFd> {
        Ok(rustix::fs::open(
            &self.interpreter,
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
        )?)
    }

    /// Registers the interpreter, opened as `interpreter`, for the image's programs, as root
    /// of the sandbox's user namespace (whose binfmt_misc this is) and inside the image: a
    /// mount namespace of that user namespace, binfmt_misc mounted where the image's
    /// programs look for it, the registration, then that mount made read-only, so nothing
    /// the image runs changes it.
    pub fn register(&self, interpreter: &OwnedFd) -> std::io::Result<()> {
        let foreign = find(&self.architecture).expect("checked in for_image and from_args");
        // SAFETY: the sandbox's PID 1 is single-threaded (see the module's note in mod.rs).
        unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) }?;
        rustix::mount::mount(
            "binfmt_misc",
            BINFMT_MISC,
            "binfmt_misc",
            NOTHING_RUNS,
            None,
        )?;
        // The kernel follows the descriptor's link when it opens the interpreter (`F`).
        let line = registration(
            foreign,
            &format!("/proc/self/fd/{}", interpreter.as_raw_fd()),
        );
        std::fs::write(Path::new(BINFMT_MISC).join("register"), line)?;
        rustix::mount::mount_remount(
            BINFMT_MISC,
            MountFlags::BIND | MountFlags::RDONLY | NOTHING_RUNS,
            "",
        )?;
        Ok(())
    }
}

const NOTHING_RUNS: MountFlags = MountFlags::NOSUID
    .union(MountFlags::NODEV)
    .union(MountFlags::NOEXEC);

/// binfmt_misc's registration line: `:name:M::magic:mask:interpreter:F`, the magic and mask
/// written as `\xNN` escapes (binfmt_misc decodes them; a raw byte could be a `:`).
fn registration(foreign: &Foreign, interpreter: &str) -> String {
    let escaped = |bytes: &[u8]| {
        bytes
            .iter()
            .map(|b| format!("\\x{b:02x}"))
            .collect::<String>()
    };
    format!(
        ":amibake-{}:M::{}:{}:{interpreter}:F",
        foreign.qemu,
        escaped(foreign.magic),
        escaped(foreign.mask)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_architecture_needs_no_emulator() {
        let host = host_architecture();
        assert_eq!(for_image(host, Isolation::Compat).unwrap(), None);
    }

    #[test]
    fn an_architecture_amibake_cannot_emulate_is_named() {
        let err = for_image("i386", Isolation::OwnIds { base: 1 << 20 }).unwrap_err();
        assert!(err.to_string().contains("the base image is i386"), "{err}");
    }

    #[test]
    fn a_static_emulator_is_told_from_a_dynamic_one_and_from_another_machines() {
        // The smallest 64-bit ELF header with one program header at 64 of type `p_type`.
        let elf = |machine: u16, p_type: u32| {
            let mut e = vec![0u8; 64 + 56];
            e[..6].copy_from_slice(b"\x7fELF\x02\x01");
            e[18..20].copy_from_slice(&machine.to_le_bytes());
            e[32..40].copy_from_slice(&64u64.to_le_bytes());
            e[54..56].copy_from_slice(&56u16.to_le_bytes());
            e[56..58].copy_from_slice(&1u16.to_le_bytes());
            e[64..68].copy_from_slice(&p_type.to_le_bytes());
            e
        };
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            host_machine(),
            Some(0x3e),
            "x86_64's e_machine, from its magic"
        );
        assert_eq!(elf_needs_interpreter(&elf(0x3e, 1), 0x3e), Some(false));
        assert_eq!(elf_needs_interpreter(&elf(0x3e, 3), 0x3e), Some(true));
        assert_eq!(elf_needs_interpreter(&elf(0xb7, 1), 0x3e), None);
        assert_eq!(elf_needs_interpreter(b"#!/bin/sh\nexec qemu", 0x3e), None);
        // Program headers said to lie past the end of the file.
        let mut short = elf(0x3e, 1);
        short.truncate(66);
        assert_eq!(elf_needs_interpreter(&short, 0x3e), None);
    }

    #[test]
    fn an_emulator_another_user_could_change_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("qemu-aarch64-static");
        std::fs::write(&copy, b"").unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o777)).unwrap();
        let why = fit_interpreter(&copy).unwrap_err();
        assert!(
            matches!(why, Unfitness::Writable { mode: 0o777, .. }),
            "{why}"
        );
        assert!(why.to_string().contains("writable by root alone"), "{why}");
    }

    #[test]
    fn the_registration_escapes_every_byte_of_magic_and_mask() {
        let line = registration(find("arm64").unwrap(), "/proc/self/fd/5");
        assert!(
            line.starts_with(":amibake-aarch64:M::\\x7f\\x45\\x4c\\x46\\x02"),
            "{line}"
        );
        assert!(
            line.ends_with("\\xfe\\xff\\xff\\xff:/proc/self/fd/5:F"),
            "{line}"
        );
        // name, type, offset, magic, mask, interpreter, flags: no byte of them adds a field.
        assert_eq!(line.matches(':').count(), 7, "{line}");
    }
}
