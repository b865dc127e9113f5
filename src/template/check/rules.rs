//! AWS's naming rules and the small shapes a template's values take.

const AMI_NAME_MIN: usize = 3;
const AMI_NAME_MAX: usize = 128;

/// A name EC2 would refuse for an AMI.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AmiNameError {
    #[error("AMI names are {AMI_NAME_MIN} to {AMI_NAME_MAX} characters; \"{name}\" has {len}")]
    Length { name: String, len: usize },
    #[error("AMI names may not contain `{bad}` (allowed: letters, digits and ( ) [ ] space . / - ' @ _); got \"{name}\"")]
    Character { name: String, bad: char },
}

/// EC2's rule for AMI names: 3 to 128 characters of letters, digits and ( ) [ ] space . / - ' @ _
pub fn check_ami_name(name: &str) -> Result<(), AmiNameError> {
    let len = name.chars().count();
    if !(AMI_NAME_MIN..=AMI_NAME_MAX).contains(&len) {
        return Err(AmiNameError::Length {
            name: name.to_string(),
            len,
        });
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "()[] ./-'@_".contains(*c)))
    {
        return Err(AmiNameError::Character {
            name: name.to_string(),
            bad,
        });
    }
    Ok(())
}

/// `eu-west-1`, `us-gov-west-1`, `ap-southeast-4`: lowercase words and a number.
pub(super) fn is_region_name(name: &str) -> bool {
    let parts: Vec<&str> = name.split('-').collect();
    parts.len() >= 3
        && parts[..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase()))
        && parts[parts.len() - 1].parse::<u8>().is_ok()
}

pub(super) fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

pub(super) fn is_account_name(name: &str) -> bool {
    !name.is_empty()
        && (name.chars().all(|c| c.is_ascii_digit())
            || (name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-".contains(c))))
}

/// `a.b.c.d/n`, as a security group rule takes it.
pub fn is_ipv4_cidr(text: &str) -> bool {
    let Some((addr, prefix)) = text.split_once('/') else {
        return false;
    };
    addr.parse::<std::net::Ipv4Addr>().is_ok() && prefix.parse::<u8>().is_ok_and(|p| p <= 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ami_name_rules() {
        assert!(check_ami_name("shop-abc-20261123 (web) [x] ./'@_").is_ok());
        assert!(check_ami_name("ab")
            .unwrap_err()
            .to_string()
            .contains("3 to 128"));
        assert!(check_ami_name(&"a".repeat(129)).is_err());
        assert_eq!(
            check_ami_name("shop:1"),
            Err(AmiNameError::Character {
                name: "shop:1".into(),
                bad: ':'
            })
        );
    }

    #[test]
    fn small_validators() {
        assert!(is_ipv4_cidr("10.0.0.0/8"));
        assert!(!is_ipv4_cidr("10.0.0.0/33"));
        assert!(!is_ipv4_cidr("10.0.0.0"));
        assert!(is_account_name("www-data") && is_account_name("33"));
        assert!(!is_account_name("Www") && !is_account_name(""));
        assert!(is_identifier("_a1") && !is_identifier("1a") && !is_identifier("a-b"));
        assert!(is_region_name("eu-west-1") && is_region_name("us-gov-west-1"));
        assert!(
            !is_region_name("eu-west") && !is_region_name("EU-west-1") && !is_region_name("eu--1")
        );
    }
}
