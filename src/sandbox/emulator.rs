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
    #[error("the base image is {image} and this host is {host}: its programs run here through qemu's user-mode emulator, and `{binary}` is on no directory of PATH: install the `qemu-user-static` package (Debian, Ubuntu; `qemu-user-static-{qemu}` on Fedora and RHEL)")]
    Missing {
        image: String,
        host: &'static str,
        binary: String,
        qemu: &'static str,
    },
    #[error("the base image is {image}: this {host} host cannot run its programs (amibake emulates arm64 and x86_64)")]
    Unsupported { image: String, host: &'static str },
    #[error("the base image is {image} and this host is {host}: its programs run here through a binfmt_misc of the sandbox's own, which Linux {release} lacks (it needs 6.7 or later)")]
    Kernel {
        image: String,
        host: &'static str,
        release: String,
    },
    #[error("the base image is {image} and this host is {host}: its programs run only in the sandbox's own user namespace, which sandbox = \"compat\" does without")]
    Compat { image: String, host: &'static str },
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
    let interpreter = on_path(&binary).ok_or_else(|| EmulatorError::Missing {
        image: image.clone(),
        host,
        binary,
        qemu: foreign.qemu,
    })?;
    Ok(Some(Emulator {
        architecture: image,
        interpreter,
    }))
}

fn find(architecture: &str) -> Option<&'static Foreign> {
    ARCHITECTURES.iter().find(|f| f.aws == architecture)
}

/// The first executable file named `binary` in PATH's directories.
fn on_path(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|candidate| {
            rustix::fs::access(candidate, rustix::fs::Access::EXEC_OK).is_ok()
                && candidate.is_file()
        })
}

impl Emulator {
    /// The emulator of `architecture` at `interpreter`, as the internal command is told.
    pub fn from_args(architecture: &str, interpreter: PathBuf) -> Option<Emulator> {
        find(architecture).map(|_| Emulator {
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
