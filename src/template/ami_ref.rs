//! How a template names an AMI: an id, an SSM parameter in the `resolve:ssm:` form that launch
//! templates use, or a DescribeImages filter.

use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AmiRef {
    /// `ami-0123456789abcdef0`
    Id(String),
    /// `resolve:ssm:/path`, `resolve:ssm:/path:3` or `resolve:ssm:/path:prod`
    Ssm {
        parameter: String,
        selector: Option<SsmSelector>,
    },
    /// `{ owners = [...], name = "glob", most_recent = true, architecture = "x86_64" }`
    Filter(AmiFilter),
}

/// What follows the parameter name: a version number or a label (AWS forbids labels that
/// start with a digit, so the two cannot be confused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SsmSelector {
    Version(i64),
    Label(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AmiFilter {
    pub owners: Vec<String>,
    pub name: String,
    #[serde(default = "most_recent_default")]
    pub most_recent: bool,
    pub architecture: Option<String>,
}

fn most_recent_default() -> bool {
    true
}

impl fmt::Display for AmiRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AmiRef::Id(id) => f.write_str(id),
            AmiRef::Ssm {
                parameter,
                selector,
            } => {
                write!(f, "resolve:ssm:{parameter}")?;
                match selector {
                    Some(SsmSelector::Version(v)) => write!(f, ":{v}"),
                    Some(SsmSelector::Label(l)) => write!(f, ":{l}"),
                    None => Ok(()),
                }
            }
            AmiRef::Filter(filter) => write!(
                f,
                "the newest AMI named like \"{}\" owned by {}",
                filter.name,
                filter.owners.join(", ")
            ),
        }
    }
}

const SSM_PREFIX: &str = "resolve:ssm:";

/// Why a string is not an AMI reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmiRefError {
    #[error("`{0}` is not an AMI id: expected `ami-` and 8 or 17 lowercase hex digits")]
    NotAnId(String),
    #[error("`{0}` is not an AMI reference: use an id (`ami-…`), `resolve:ssm:/parameter[:version|:label]` or a filter table {{ owners = [...], name = \"…\" }}")]
    NotAReference(String),
    #[error("`{0}` is not an SSM parameter name: it must start with `/` and use only letters, digits and / _ . -")]
    ParameterName(String),
    #[error("empty version or label after the parameter name")]
    EmptySelector,
    #[error("`{0}` is not a parameter version number")]
    VersionNumber(String),
    #[error("parameter versions start at 1, not {0}")]
    VersionZero(i64),
}

/// A reference whose `${…}` did not expand, or which expanded into no reference.
#[derive(Debug, thiserror::Error)]
pub enum InterpolatedRefError<E: std::error::Error + 'static> {
    #[error(transparent)]
    Expand(E),
    #[error(transparent)]
    Reference(#[from] AmiRefError),
}

impl AmiRef {
    /// Parses the string forms. The filter form only comes from a TOML table.
    pub fn parse(text: &str) -> Result<AmiRef, AmiRefError> {
        if let Some(rest) = text.strip_prefix(SSM_PREFIX) {
            return parse_ssm(rest);
        }
        if let Some(hex) = text.strip_prefix("ami-") {
            // EC2 ids are 8 (older) or 17 lowercase hex digits.
            if (hex.len() == 8 || hex.len() == 17)
                && hex
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
            {
                return Ok(AmiRef::Id(text.to_string()));
            }
            return Err(AmiRefError::NotAnId(text.to_string()));
        }
        Err(AmiRefError::NotAReference(text.to_string()))
    }

    /// References may contain `${...}`; those are parsed after interpolation.
    pub fn interpolated<E: std::error::Error + 'static>(
        &self,
        mut expand: impl FnMut(&str) -> Result<String, E>,
    ) -> Result<AmiRef, InterpolatedRefError<E>> {
        let mut expand = |text: &str| expand(text).map_err(InterpolatedRefError::Expand);
        match self {
            AmiRef::Id(id) => Ok(AmiRef::parse(&expand(id)?)?),
            AmiRef::Ssm { .. } => Ok(AmiRef::parse(&expand(&self.to_string())?)?),
            AmiRef::Filter(f) => Ok(AmiRef::Filter(AmiFilter {
                owners: f
                    .owners
                    .iter()
                    .map(|o| expand(o))
                    .collect::<Result<_, _>>()?,
                name: expand(&f.name)?,
                most_recent: f.most_recent,
                architecture: f.architecture.as_deref().map(&mut expand).transpose()?,
            })),
        }
    }
}

fn parse_ssm(rest: &str) -> Result<AmiRef, AmiRefError> {
    // Parameter names cannot contain ':', so the first one starts the selector.
    let (parameter, selector) = match rest.split_once(':') {
        Some((p, s)) => (p, Some(s)),
        None => (rest, None),
    };
    let name_ok = parameter.len() > 1
        && parameter.starts_with('/')
        && parameter
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/_.-${}".contains(c));
    if !name_ok {
        return Err(AmiRefError::ParameterName(parameter.to_string()));
    }
    let selector = match selector {
        None => None,
        Some("") => return Err(AmiRefError::EmptySelector),
        Some(s) if s.starts_with(|c: char| c.is_ascii_digit()) => {
            let v: i64 = s
                .parse()
                .map_err(|_| AmiRefError::VersionNumber(s.to_string()))?;
            if v < 1 {
                return Err(AmiRefError::VersionZero(v));
            }
            Some(SsmSelector::Version(v))
        }
        Some(s) => Some(SsmSelector::Label(s.to_string())),
    };
    Ok(AmiRef::Ssm {
        parameter: parameter.to_string(),
        selector,
    })
}

impl<'de> Deserialize<'de> for AmiRef {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AmiRefVisitor;
        impl<'de> Visitor<'de> for AmiRefVisitor {
            type Value = AmiRef;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an AMI id, a `resolve:ssm:` reference or a filter table")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<AmiRef, E> {
                // `${...}` is checked after interpolation; keep the raw text until then.
                if v.contains("${") {
                    return Ok(match v.strip_prefix(SSM_PREFIX) {
                        Some(rest) => parse_ssm(rest).map_err(E::custom)?,
                        None => AmiRef::Id(v.to_string()),
                    });
                }
                AmiRef::parse(v).map_err(E::custom)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<AmiRef, A::Error> {
                AmiFilter::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(AmiRef::Filter)
            }
        }
        deserializer.deserialize_any(AmiRefVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ids() {
        assert_eq!(
            AmiRef::parse("ami-0123456789abcdef0").unwrap(),
            AmiRef::Id("ami-0123456789abcdef0".into())
        );
        assert!(AmiRef::parse("ami-12").is_err());
        assert!(AmiRef::parse("ami-0123456789ABCDEF0").is_err());
    }

    #[test]
    fn parses_ssm_with_version_label_or_nothing() {
        let p = |s| AmiRef::parse(s).unwrap();
        assert_eq!(
            p("resolve:ssm:/amibake/shop/base:3"),
            AmiRef::Ssm {
                parameter: "/amibake/shop/base".into(),
                selector: Some(SsmSelector::Version(3))
            }
        );
        assert_eq!(
            p("resolve:ssm:/amibake/shop/base:prod"),
            AmiRef::Ssm {
                parameter: "/amibake/shop/base".into(),
                selector: Some(SsmSelector::Label("prod".into()))
            }
        );
        assert_eq!(p("resolve:ssm:/a/b").to_string(), "resolve:ssm:/a/b");
        assert!(AmiRef::parse("resolve:ssm:a/b").is_err());
        assert!(AmiRef::parse("resolve:ssm:/a:0").is_err());
        assert!(AmiRef::parse("resolve:ssm:/a:").is_err());
        assert!(AmiRef::parse("debian-12").is_err());
    }
}
