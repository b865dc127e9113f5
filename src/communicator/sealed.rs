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
//! The instance needs `openssl` and `base64`; the usual EC2 images of the major
//! distributions carry both.

use openssl::cms::{CMSOptions, CmsContentInfo};
use openssl::stack::Stack;
use openssl::symm::Cipher;
use openssl::x509::X509;

/// Where the instance keeps its key and the opened commands, readable by root alone.
const KEY_DIR: &str = "/run/amibake-sealed";

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
opened=$(mktemp {KEY_DIR}/command.XXXXXX)
printf %s '{encoded}' | base64 -d | openssl cms -decrypt -binary -inform DER -inkey {KEY_DIR}/key.pem -out "$opened" || {{
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// `MAKE_KEY` and `seal`'s command with the key directory moved under `dir`, run with
    /// this machine's `sh` and `openssl`.
    fn in_dir(script: &str, dir: &std::path::Path) -> String {
        script.replace(KEY_DIR, &dir.join("sealed").to_string_lossy())
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
    fn what_is_not_a_certificate_is_named() {
        let err = Recipient::from_pem("hello").err().unwrap();
        assert!(
            err.contains("no certificate") && err.contains("hello"),
            "{err}"
        );
    }
}
