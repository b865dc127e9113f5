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
//! under a key of its own, and that key travels only inside a sealed command. A bucket
//! that keeps old versions of its objects keeps ciphertext.
//!
//! The instance needs `openssl` and `base64`; the usual EC2 images of the major
//! distributions carry both.

use std::io::{Read, Write};
use std::path::Path;

use openssl::cms::{CMSOptions, CmsContentInfo};
use openssl::stack::Stack;
use openssl::symm::{Cipher, Crypter, Mode};
use openssl::x509::X509;

/// Where the instance keeps its key, the opened commands and the files fetched for it,
/// readable by root alone.
pub const DIR: &str = "/run/amibake-sealed";

/// Makes the instance's key pair afresh and prints its certificate (the public key, which
/// CMS takes in a certificate); only the certificate is ever printed.
pub const MAKE_KEY: &str = r#"set -e
umask 077
for tool in openssl base64 mktemp; do
  command -v "$tool" >/dev/null || { echo "the image has no \`$tool\`, which receiving commands sealed to the instance's own key needs" >&2; exit 127; }
done
rm -rf -- /run/amibake-sealed
mkdir -m 700 -- /run/amibake-sealed
openssl ecparam -name prime256v1 -genkey -noout -out /run/amibake-sealed/key.pem
openssl req -new -x509 -key /run/amibake-sealed/key.pem -subj /CN=amibake-sealed -days 7"#;

/// Removes the key and whatever opened command a cancel left beside it.
pub const FORGET_KEY: &str = "rm -rf -- /run/amibake-sealed";

/// The exit code of a command the instance could not open.
pub const UNOPENED: i32 = 125;

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
    /// runs it with `/bin/sh`, removes it and exits with its code.
    pub fn seal(&self, script: &str) -> Result<String, String> {
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
            r#"set -e
umask 077
opened=$(mktemp {DIR}/command.XXXXXX)
printf %s '{encoded}' | base64 -d | openssl cms -decrypt -binary -inform DER -inkey {DIR}/key.pem -out "$opened" || {{
  echo "this command was sealed to a key this instance no longer holds" >&2
  exit {UNOPENED}
}}
set +e
/bin/sh "$opened"
code=$?
rm -f -- "$opened"
exit $code"#
        ))
    }
}

/// The key a file was sealed with, for the command that opens it on the instance.
pub struct FileKey {
    key: [u8; 32],
    iv: [u8; 16],
}

/// Seals the file at `source` into `into` as it is read, under a key made for it alone.
pub fn seal_file(source: &Path, into: &mut impl Write) -> Result<FileKey, String> {
    let mut sealed = FileKey {
        key: [0; 32],
        iv: [0; 16],
    };
    openssl::rand::rand_bytes(&mut sealed.key).map_err(|e| e.to_string())?;
    openssl::rand::rand_bytes(&mut sealed.iv).map_err(|e| e.to_string())?;
    let cipher = Cipher::aes_256_cbc();
    let mut crypter = Crypter::new(cipher, Mode::Encrypt, &sealed.key, Some(&sealed.iv))
        .map_err(|e| e.to_string())?;
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
        into.write_all(&out[..written])
            .map_err(|e| format!("cannot write the sealed copy: {e}"))?;
        if read == 0 {
            return Ok(sealed);
        }
    }
}

impl FileKey {
    /// The command that opens the sealed file `sealed` into `out` (both shell words) on
    /// the instance: the key is in it, so it goes only inside a sealed command.
    pub fn open_command(&self, sealed: &str, out: &str) -> String {
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        format!(
            "openssl enc -d -aes-256-cbc -K {} -iv {} -in {sealed} -out {out}",
            hex(&self.key),
            hex(&self.iv)
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
        let command = recipient
            .seal(&format!("TOKEN='{secret}'\necho \"got $TOKEN\"\nexit 7"))
            .unwrap();
        assert!(!command.contains(secret), "{command}");
        let ran = sh(&in_dir(&command, dir.path()));
        assert_eq!(ran.status.code(), Some(7), "{ran:?}");
        assert_eq!(
            String::from_utf8_lossy(&ran.stdout),
            format!("got {secret}\n")
        );
        // The opened command is removed once it ran: the key alone is left.
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
        assert_eq!(sealed.len(), (contents.len() / 16 + 1) * 16);
        assert!(!sealed.windows(64).any(|w| w == &contents[..64]));
        std::fs::write(dir.path().join("sealed"), &sealed).unwrap();
        let opened = dir.path().join("opened");
        let command = key.open_command(
            &dir.path().join("sealed").to_string_lossy(),
            &opened.to_string_lossy(),
        );
        let ran = sh(&command);
        assert!(ran.status.success(), "{ran:?}");
        assert_eq!(std::fs::read(&opened).unwrap(), contents);
        // Each file has a key of its own.
        let other = seal_file(&dir.path().join("plain"), &mut Vec::new()).unwrap();
        assert_ne!(other.key, key.key);
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
