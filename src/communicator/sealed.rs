//! Commands sealed to a key the instance made, for SSM.
//!
//! SSM keeps every command it is sent, readable with ListCommands for weeks, so a secret in
//! a provisioner's environment, command or file must not reach it in the clear. The
//! instance makes a key pair at its first command (`MAKE_KEY`) and answers its certificate;
//! each command of the template is then sent as CMS enveloped data for that certificate
//! (ECDH on P-256, AES-256), opened on the instance with `openssl cms` and run from a
//! private file. The private key never leaves the instance: it lives in `/run` (memory on
//! the images AWS and the distributions publish) and is removed before the instance's disk
//! becomes an image (`FORGET_KEY`), or goes with the instance. What SSM kept is then
//! ciphertext no one can open.
//!
//! A file too large for a command goes through S3 (see `ssm`): it is sealed with AES-256
//! under a key of its own (`openssl enc -pbkdf2`'s format, opened from a file so the key is
//! never a process's argument), and that key travels only inside a sealed command, with
//! the sealed copy's SHA-256: a copy changed in the bucket is refused, not opened.
//!
//! The instance needs `openssl`, and coreutils' `base64`, `dd` and `sha256sum`; the usual
//! EC2 images of the major distributions carry them.

use std::io::{Read, Write};
use std::path::Path;

use openssl::cms::{CMSOptions, CmsContentInfo};
use openssl::hash::MessageDigest;
use openssl::stack::Stack;
use openssl::symm::{Cipher, Crypter, Mode};
use openssl::x509::X509;
use sha2::{Digest, Sha256};

use super::quote;

/// Where the instance keeps its key, the opened commands and the files fetched for it,
/// readable by root alone.
pub const DIR: &str = "/run/amibake-sealed";

/// Makes the instance's key pair afresh and prints its certificate (the public key, which
/// CMS takes in a certificate); only the certificate is ever printed.
pub const MAKE_KEY: &str = r#"set -e
umask 077
for tool in openssl base64 mktemp dd sha256sum; do
  command -v "$tool" >/dev/null || { echo "the image has no \`$tool\`, which receiving commands sealed to the instance's own key needs" >&2; exit 127; }
done
rm -rf -- /run/amibake-sealed
mkdir -m 700 -- /run/amibake-sealed
openssl ecparam -name prime256v1 -genkey -noout -out /run/amibake-sealed/key.pem
openssl req -new -x509 -key /run/amibake-sealed/key.pem -subj /CN=amibake-sealed -days 7"#;

/// Removes the key and whatever opened command a cancel left beside it.
pub const FORGET_KEY: &str = "rm -rf -- /run/amibake-sealed";

/// The exit code of a command the instance could not open.
const UNOPENED: i32 = 125;

/// The certificate the instance answered: what its commands are sealed for.
pub struct Recipient {
    certificate: X509,
}

impl Recipient {
    /// Reads the certificate `MAKE_KEY` printed.
    pub fn from_pem(printed: &str) -> Result<Recipient, String> {
        X509::from_pem(printed.trim().as_bytes())
            .map(|certificate| Recipient { certificate })
            .map_err(|e| format!("the instance answered no certificate ({e}): {printed:?}"))
    }

    /// `script` sealed for the instance, in a command that opens it into a private file,
    /// removes the file once the shell holds it open (a command killed midway leaves no
    /// plaintext behind), and runs it with `/bin/sh` under the agent's own umask.
    pub fn seal(&self, script: &str) -> Result<String, String> {
        // The script closes the wrapper's hold on it; on its first line, so that the line
        // numbers of its errors stay its own.
        let script = format!("exec 3<&- ; {script}");
        let mut recipients = Stack::new().map_err(|e| e.to_string())?;
        recipients
            .push(self.certificate.clone())
            .map_err(|e| e.to_string())?;
        let sealed = CmsContentInfo::encrypt(
            &recipients,
            script.as_bytes(),
            Cipher::aes_256_cbc(),
            CMSOptions::BINARY,
        )
        .and_then(|envelope| envelope.to_der())
        .map_err(|e| format!("cannot seal a command: {e}"))?;
        let encoded = aws_smithy_types::base64::encode(&sealed);
        Ok(format!(
            r#"unopened() {{
  echo "this command was sealed to a key this instance no longer holds (was it restarted?)" >&2
  exit {UNOPENED}
}}
[ -r {DIR}/key.pem ] || unopened
opened=$(mktemp {DIR}/command.XXXXXX) || unopened
printf %s '{encoded}' | base64 -d | openssl cms -decrypt -binary -inform DER -inkey {DIR}/key.pem -out "$opened" || {{
  rm -f -- "$opened"
  unopened
}}
exec 3<"$opened"
rm -f -- "$opened"
exec /bin/sh /dev/fd/3"#
        ))
    }
}

/// `openssl enc -pbkdf2`'s defaults, spelt out on both sides.
const PBKDF2_ITERATIONS: usize = 10_000;
const SALTED: &[u8] = b"Salted__";

/// What opens a sealed file: its password (a key of its own, made for it alone) and the
/// sealed copy's SHA-256.
pub struct FileKey {
    password: String,
    digest: String,
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Seals the file at `source` into `into` as it is read, as `openssl enc -aes-256-cbc
/// -pbkdf2` would under a random password.
pub fn seal_file(source: &Path, into: &mut impl Write) -> Result<FileKey, String> {
    let mut secret = [0u8; 32];
    let mut salt = [0u8; 8];
    openssl::rand::rand_bytes(&mut secret).map_err(|e| e.to_string())?;
    openssl::rand::rand_bytes(&mut salt).map_err(|e| e.to_string())?;
    let password = hex(&secret);
    let mut key_iv = [0u8; 48];
    openssl::pkcs5::pbkdf2_hmac(
        password.as_bytes(),
        &salt,
        PBKDF2_ITERATIONS,
        MessageDigest::sha256(),
        &mut key_iv,
    )
    .map_err(|e| e.to_string())?;
    let cipher = Cipher::aes_256_cbc();
    let mut crypter = Crypter::new(cipher, Mode::Encrypt, &key_iv[..32], Some(&key_iv[32..]))
        .map_err(|e| e.to_string())?;
    let mut digest = Sha256::new();
    let mut write = |bytes: &[u8]| {
        digest.update(bytes);
        into.write_all(bytes)
            .map_err(|e| format!("cannot write the sealed copy: {e}"))
    };
    write(SALTED)?;
    write(&salt)?;
    let mut file = std::fs::File::open(source)
        .map_err(|e| format!("cannot read {}: {e}", source.display()))?;
    let mut plain = vec![0; 64 << 10];
    let mut out = vec![0; plain.len() + cipher.block_size()];
    loop {
        let read = file
            .read(&mut plain)
            .map_err(|e| format!("cannot read {}: {e}", source.display()))?;
        let written = match read {
            0 => crypter.finalize(&mut out),
            n => crypter.update(&plain[..n], &mut out),
        }
        .map_err(|e| e.to_string())?;
        write(&out[..written])?;
        if read == 0 {
            break;
        }
    }
    Ok(FileKey {
        password,
        digest: hex(&digest.finalize()),
    })
}

impl FileKey {
    /// The command that checks the sealed file at `sealed` (a path) is the one sealed here
    /// and opens it into `out` (a shell word) on the instance. The password is in it, so
    /// it goes only inside a sealed command; on the instance it passes through a private
    /// file beside the copy, never a process's arguments.
    pub fn open_command(&self, sealed: &str, out: &str) -> String {
        let (file, password) = (quote(sealed), quote(&format!("{sealed}.password")));
        format!(
            "printf '%s  %s\\n' {digest} {file} | sha256sum -c --status - || {{ echo \"the copy fetched from the bucket is not the one sealed for this instance\" >&2; exit 1; }}; \
             (umask 077; printf '%s\\n' {pass} > {password}); \
             openssl enc -d -aes-256-cbc -pbkdf2 -iter {PBKDF2_ITERATIONS} -md sha256 -pass file:{password} -in {file} -out {out}; \
             rm -f -- {password}",
            digest = self.digest,
            pass = self.password,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// `MAKE_KEY` and `seal`'s command with the key directory moved under `dir`, run with
    /// this machine's `sh` and `openssl`.
    fn in_dir(script: &str, dir: &std::path::Path) -> String {
        script.replace(DIR, &dir.join("sealed").to_string_lossy())
    }

    fn sh(script: &str) -> std::process::Output {
        Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .output()
            .unwrap()
    }

    #[test]
    fn a_sealed_command_runs_on_the_instance_that_made_the_key_and_nowhere_else() {
        let dir = tempfile::tempdir().unwrap();
        let made = sh(&in_dir(MAKE_KEY, dir.path()));
        assert!(made.status.success(), "{made:?}");
        let printed = String::from_utf8(made.stdout).unwrap();
        assert!(
            !printed.contains("PRIVATE"),
            "only the certificate: {printed}"
        );
        let recipient = Recipient::from_pem(&printed).unwrap();

        let secret = "s3cr3t-t0ken";
        // What the command finds while it runs: its umask, and what else the key's
        // directory holds.
        let sealed_dir = dir.path().join("sealed");
        let command = recipient
            .seal(&format!(
                "TOKEN='{secret}'\necho \"got $TOKEN\"\numask\nls {}\nexit 7",
                sealed_dir.display()
            ))
            .unwrap();
        assert!(!command.contains(secret), "{command}");
        let ran = sh(&format!("umask 022; {}", in_dir(&command, dir.path())));
        assert_eq!(ran.status.code(), Some(7), "{ran:?}");
        // The agent's umask, and the opened command already removed while it runs: a
        // command killed midway leaves no plaintext.
        assert_eq!(
            String::from_utf8_lossy(&ran.stdout),
            format!("got {secret}\n0022\nkey.pem\n")
        );
        // Nothing of it is left once it ran: the key alone.
        let left: Vec<_> = std::fs::read_dir(dir.path().join("sealed"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["key.pem"]);

        // A new key (another instance, or the key made again): the command cannot be
        // opened, and says so.
        let again = sh(&in_dir(MAKE_KEY, dir.path()));
        assert!(again.status.success(), "{again:?}");
        let refused = sh(&in_dir(&command, dir.path()));
        assert_eq!(refused.status.code(), Some(UNOPENED), "{refused:?}");
        assert!(String::from_utf8_lossy(&refused.stderr).contains("no longer holds"));
        assert!(refused.stdout.is_empty());
    }

    #[test]
    fn an_image_without_openssl_is_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let made = Command::new("/bin/sh")
            .arg("-c")
            .arg(in_dir(MAKE_KEY, dir.path()))
            .env("PATH", dir.path())
            .output()
            .unwrap();
        assert_eq!(made.status.code(), Some(127), "{made:?}");
        let said = String::from_utf8_lossy(&made.stderr);
        assert!(said.contains("the image has no `openssl`"), "{said}");
        assert!(made.stdout.is_empty());
    }

    #[test]
    fn a_sealed_file_opens_whole_with_its_own_key_and_is_not_itself() {
        let dir = tempfile::tempdir().unwrap();
        // Not a whole number of AES blocks, nor of the read buffer.
        let contents: Vec<u8> = (0..200_003u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(dir.path().join("plain"), &contents).unwrap();
        let mut sealed = Vec::new();
        let key = seal_file(&dir.path().join("plain"), &mut sealed).unwrap();
        // openssl enc's header, then whole blocks.
        assert_eq!(&sealed[..8], b"Salted__");
        assert_eq!(sealed.len(), 16 + (contents.len() / 16 + 1) * 16);
        assert!(!sealed.windows(64).any(|w| w == &contents[..64]));
        let copy = dir.path().join("sealed copy");
        std::fs::write(&copy, &sealed).unwrap();
        let opened = dir.path().join("opened");
        let command = key.open_command(&copy.to_string_lossy(), &quote(&opened.to_string_lossy()));
        // The password is never a process's argument.
        assert!(
            !command.contains("-K ") && command.contains("-pass file:"),
            "{command}"
        );
        let ran = sh(&format!("set -e; {command}"));
        assert!(ran.status.success(), "{ran:?}");
        assert_eq!(std::fs::read(&opened).unwrap(), contents);
        assert!(!dir.path().join("sealed copy.password").exists());
        // Each file has a password of its own.
        let other = seal_file(&dir.path().join("plain"), &mut Vec::new()).unwrap();
        assert_ne!(other.password, key.password);

        // A copy changed in the bucket (one bit of one block) is refused, not opened.
        std::fs::remove_file(&opened).unwrap();
        let mut changed = sealed.clone();
        changed[40] ^= 1;
        std::fs::write(&copy, &changed).unwrap();
        let refused = sh(&format!("set -e; {command}"));
        assert!(!refused.status.success(), "{refused:?}");
        assert!(String::from_utf8_lossy(&refused.stderr).contains("is not the one sealed"));
        assert!(!opened.exists());
    }

    #[test]
    fn what_is_not_a_certificate_is_named() {
        let err = Recipient::from_pem("hello").err().unwrap();
        assert!(
            err.contains("no certificate") && err.contains("hello"),
            "{err}"
        );
    }
}
