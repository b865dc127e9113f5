//! What an instance printed to its console. At first boot cloud-init prints the SSH host
//! keys there (its `write-ssh-key-fingerprints` blocks), and EC2 hands the console to the
//! account alone: the one channel that vouches for a host key before the first connection.

use super::{AwsError, Clients};

/// The host keys an instance's console names: SHA-256 fingerprints (`SHA256:…`) and whole
/// public keys (their base64 blobs).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PrintedHostKeys {
    pub fingerprints: Vec<String>,
    pub keys: Vec<String>,
}

impl PrintedHostKeys {
    pub fn is_empty(&self) -> bool {
        self.fingerprints.is_empty() && self.keys.is_empty()
    }

    /// Whether a key with this blob (base64) and SHA-256 fingerprint is one of them.
    pub fn names(&self, blob_base64: &str, fingerprint: &str) -> bool {
        self.keys.iter().any(|k| k == blob_base64)
            || self.fingerprints.iter().any(|f| f == fingerprint)
    }

    /// The keys and fingerprints between cloud-init's markers, wherever a line has them
    /// (consoles prefix lines with `ec2: ` or `ci-info: `). Other fingerprints (MD5, on old
    /// images) are not taken.
    pub fn parse(console: &str) -> PrintedHostKeys {
        let mut printed = PrintedHostKeys::default();
        let mut block = None;
        for line in console.lines() {
            let line = line.trim_end_matches('\r');
            if line.contains("-----BEGIN SSH HOST KEY FINGERPRINTS-----") {
                block = Some(Block::Fingerprints);
            } else if line.contains("-----BEGIN SSH HOST KEY KEYS-----") {
                block = Some(Block::Keys);
            } else if line.contains("-----END SSH HOST KEY") {
                block = None;
            } else if let Some(block) = block {
                let words: Vec<&str> = line.split_whitespace().collect();
                match block {
                    Block::Fingerprints => printed.fingerprints.extend(
                        words
                            .iter()
                            .filter(|w| w.starts_with("SHA256:"))
                            .map(|w| w.to_string()),
                    ),
                    // `type base64 comment`, maybe after a prefix.
                    Block::Keys => {
                        if let Some(at) = words.iter().position(|w| is_key_type(w)) {
                            if let Some(blob) = words.get(at + 1) {
                                printed.keys.push(blob.to_string());
                            }
                        }
                    }
                }
            }
        }
        printed
    }
}

#[derive(Debug, Clone, Copy)]
enum Block {
    Fingerprints,
    Keys,
}

fn is_key_type(word: &str) -> bool {
    word.starts_with("ssh-") || word.starts_with("ecdsa-") || word.starts_with("sk-")
}

/// The host keys `instance_id` has printed so far; none while its console is empty.
pub async fn printed_host_keys(
    clients: &Clients,
    instance_id: &str,
) -> Result<PrintedHostKeys, AwsError> {
    let action = || format!("GetConsoleOutput {instance_id}");
    // `latest` reads the console as it is now, on the instance types that have it (Nitro);
    // others answer UnsupportedOperation and give their buffered output without it.
    let answer = match clients
        .ec2
        .get_console_output()
        .instance_id(instance_id)
        .latest(true)
        .send()
        .await
    {
        Ok(answer) => answer,
        Err(e) if super::resources::code(&e) == Some("UnsupportedOperation") => clients
            .ec2
            .get_console_output()
            .instance_id(instance_id)
            .send()
            .await
            .map_err(|e| AwsError::new(action(), e))?,
        Err(e) => return Err(AwsError::new(action(), e)),
    };
    let Some(encoded) = answer.output() else {
        return Ok(PrintedHostKeys::default());
    };
    let text = aws_smithy_types::base64::decode(encoded).map_err(|e| {
        AwsError::answer(action(), format!("the console output is not base64: {e}"))
    })?;
    Ok(PrintedHostKeys::parse(&String::from_utf8_lossy(&text)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As an Amazon Linux console prints them, with the noise around.
    const CONSOLE: &str = "\
[   12.3] cloud-init[1234]: Cloud-init v. 22.2.2 running 'modules:final'\r
ec2: \r
ec2: #############################################################\r
ec2: -----BEGIN SSH HOST KEY FINGERPRINTS-----\r
ec2: 256 SHA256:ZXZlcnl0aGluZyBpcyBmaW5l root@ip-172-31-5-9.ec2.internal (ECDSA)\r
ec2: 256 SHA256:bm90aGluZyB0byBzZWUgaGVyZQ root@ip-172-31-5-9.ec2.internal (ED25519)\r
ec2: -----END SSH HOST KEY FINGERPRINTS-----\r
ec2: #############################################################\r
-----BEGIN SSH HOST KEY KEYS-----\r
ecdsa-sha2-nistp256 AAAAE2VjZHNh root@ip-172-31-5-9.ec2.internal\r
ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 root@ip-172-31-5-9.ec2.internal\r
-----END SSH HOST KEY KEYS-----\r
[   13.0] cloud-init[1234]: Cloud-init v. 22.2.2 finished\r
";

    #[test]
    fn cloud_init_blocks_give_fingerprints_and_keys() {
        let printed = PrintedHostKeys::parse(CONSOLE);
        assert_eq!(
            printed.fingerprints,
            [
                "SHA256:ZXZlcnl0aGluZyBpcyBmaW5l",
                "SHA256:bm90aGluZyB0byBzZWUgaGVyZQ"
            ]
        );
        assert_eq!(printed.keys, ["AAAAE2VjZHNh", "AAAAC3NzaC1lZDI1NTE5"]);
        assert!(printed.names("AAAAC3NzaC1lZDI1NTE5", "SHA256:other"));
        assert!(printed.names("other", "SHA256:ZXZlcnl0aGluZyBpcyBmaW5l"));
        assert!(!printed.names("other", "SHA256:other"));
    }

    #[test]
    fn a_console_without_the_blocks_names_nothing() {
        let printed = PrintedHostKeys::parse("[    0.0] Linux version 6.1\nSHA256:notinablock\n");
        assert!(printed.is_empty());
    }
}
