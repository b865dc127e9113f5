//! The identity of one run: its build id (tagged on everything it creates, so a crashed run
//! can be swept) and its timestamp (`${timestamp}` in templates).

use std::io::Read;

/// `20261123T150800Z`-style UTC timestamp without separators, which AMI names allow.
pub fn timestamp_now() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}{:02}{:02}{:02}{:02}{:02}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    )
}

/// `ab-TIMESTAMP-XXXXXXXX`: sortable by start time, unique across hosts by 32 random bits.
pub fn new_build_id(timestamp: &str) -> String {
    let mut bytes = [0u8; 4];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if random.is_err() {
        // No /dev/urandom (a very odd host): the process id and clock still separate runs.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        bytes = (nanos ^ std::process::id()).to_be_bytes();
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("ab-{timestamp}-{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_ids_are_unique_and_shaped() {
        let ts = timestamp_now();
        assert_eq!(ts.len(), 14);
        let (a, b) = (new_build_id(&ts), new_build_id(&ts));
        assert_ne!(a, b);
        assert!(a.starts_with(&format!("ab-{ts}-")) && a.len() == 3 + 14 + 1 + 8);
    }
}
