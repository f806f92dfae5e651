//! FHIR releases and how they are named.
//!
//! [`FhirVersion`] names a FHIR release the way each place in the protocol does: the
//! `fhirVersion` MIME-type parameter (`3.0`), a CapabilityStatement's `fhirVersion` (`3.0.2`),
//! or the release's name (`STU3`). The routing layer reads it from request extensions to pick
//! a tenant's upstream for that release.
//!
//! ```
//! use tower_fhir::version::FhirVersion;
//!
//! let stu3: FhirVersion = "3.0".parse().unwrap();
//! assert_eq!(stu3, FhirVersion::Stu3);
//! assert_eq!("3.0.1".parse::<FhirVersion>().unwrap(), stu3);
//! assert_eq!(stu3.mime_code(), "3.0");
//! assert_eq!(stu3.release(), "3.0.2");
//! assert_eq!(stu3.to_string(), "3.0");
//! assert_eq!(FhirVersion::Dstu2.json_media_type(), "application/json+fhir");
//! assert!("2.0".parse::<FhirVersion>().is_err());
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[cfg(feature = "proxy")]
pub(crate) mod dstu2;
mod layer;
mod media;
mod response;

pub(crate) use layer::fallbacks;
#[cfg(test)]
pub(crate) use layer::parameters_of;
#[cfg(test)]
pub(crate) use layer::VersionsForm;
pub(crate) use layer::VersionsQuery;
pub use layer::{
    ConfigError, VersionNegotiation, VersionNegotiationBuilder, VersionNegotiationLayer,
};
#[cfg(feature = "proxy")]
pub(crate) use response::label;
pub use response::ResponseFuture;
pub(crate) use response::{vary_by, vary_on};

/// Whether a request asks for XML rather than JSON (see [`layer::prefers_xml`]).
pub(crate) use layer::prefers_xml;

/// A FHIR release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum FhirVersion {
    /// DSTU2, 1.0.2 (MIME code `1.0`).
    Dstu2,
    /// STU3, 3.0.x (MIME code `3.0`).
    Stu3,
    /// R4, 4.0.1 (MIME code `4.0`).
    R4,
    /// R4B, 4.3.0 (MIME code `4.3`).
    R4B,
    /// R5, 5.0.0 (MIME code `5.0`).
    R5,
}

impl FhirVersion {
    /// Every release, oldest first.
    pub const ALL: [FhirVersion; 5] = [Self::Dstu2, Self::Stu3, Self::R4, Self::R4B, Self::R5];

    /// The `fhirVersion` MIME-type parameter value (FHIR versioning.html): `1.0`, `3.0`, ...
    pub fn mime_code(self) -> &'static str {
        match self {
            Self::Dstu2 => "1.0",
            Self::Stu3 => "3.0",
            Self::R4 => "4.0",
            Self::R4B => "4.3",
            Self::R5 => "5.0",
        }
    }

    /// The full version of the release's last technical correction: `1.0.2`, `3.0.2`, ...
    pub fn release(self) -> &'static str {
        match self {
            Self::Dstu2 => "1.0.2",
            Self::Stu3 => "3.0.2",
            Self::R4 => "4.0.1",
            Self::R4B => "4.3.0",
            Self::R5 => "5.0.0",
        }
    }

    /// The release's name: `DSTU2`, `STU3`, `R4`, `R4B`, `R5`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Dstu2 => "DSTU2",
            Self::Stu3 => "STU3",
            Self::R4 => "R4",
            Self::R4B => "R4B",
            Self::R5 => "R5",
        }
    }

    /// The release's JSON media type: `application/json+fhir` in DSTU2,
    /// `application/fhir+json` from STU3 on.
    pub fn json_media_type(self) -> &'static str {
        match self {
            Self::Dstu2 => "application/json+fhir",
            _ => "application/fhir+json",
        }
    }

    /// The release's XML media type: `application/xml+fhir` for DSTU2, `application/fhir+xml`
    /// after.
    pub fn xml_media_type(self) -> &'static str {
        match self {
            Self::Dstu2 => "application/xml+fhir",
            _ => "application/fhir+xml",
        }
    }

    /// Parses a MIME code (`3.0`), a full version (`3.0.1`, also a ballot's `3.0.0-...`) or a
    /// name (`STU3`, any case).
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        if let Some(version) = Self::ALL
            .into_iter()
            .find(|v| v.name().eq_ignore_ascii_case(text))
        {
            return Some(version);
        }
        // `major.minor`, optionally followed by `.patch` and a pre-release label.
        let mut numbers = text.splitn(3, '.');
        let major = numbers.next()?;
        let minor = numbers.next()?;
        if let Some(rest) = numbers.next() {
            let patch = rest.split(['-', '+']).next()?;
            if patch.is_empty() || !patch.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
        }
        Self::ALL.into_iter().find(|v| {
            v.mime_code()
                .split_once('.')
                .is_some_and(|(ma, mi)| ma == major && mi == minor)
        })
    }
}

impl fmt::Display for FhirVersion {
    /// The MIME code; `{:#}` gives the full release instead.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if f.alternate() {
            f.write_str(self.release())
        } else {
            f.write_str(self.mime_code())
        }
    }
}

/// The release a request's media types suggest when it names none, in the request
/// extensions beside (never instead of) a negotiated [`FhirVersion`].
///
/// A client whose `Accept` (or, but on a `GET` or `HEAD`, `Content-Type`) uses only DSTU2's
/// media types (`application/json+fhir`, `application/xml+fhir`) and no `fhirVersion` is a
/// DSTU2 client: [`VersionNegotiationLayer`] puts `VersionHint(FhirVersion::Dstu2)` in its
/// extensions; routing sends it to the tenant's DSTU2 server when the tenant has one (its
/// default server otherwise), and the [`MetadataLayer`](crate::metadata::MetadataLayer)
/// answers its `metadata` without a token in DSTU2. STU3 and later clients, which list the
/// newer types (HAPI lists both), get no hint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VersionHint(pub FhirVersion);

/// A string that names no FHIR release this crate knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownFhirVersion(pub String);

impl fmt::Display for UnknownFhirVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown FHIR version {:?}", self.0)
    }
}

impl std::error::Error for UnknownFhirVersion {}

impl FromStr for FhirVersion {
    type Err = UnknownFhirVersion;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s).ok_or_else(|| UnknownFhirVersion(s.to_owned()))
    }
}

impl Serialize for FhirVersion {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.mime_code())
    }
}

impl<'de> Deserialize<'de> for FhirVersion {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spelling() {
        for (text, version) in [
            ("1.0", FhirVersion::Dstu2),
            ("1.0.2", FhirVersion::Dstu2),
            ("dstu2", FhirVersion::Dstu2),
            ("3.0", FhirVersion::Stu3),
            ("3.0.1", FhirVersion::Stu3),
            ("3.0.2", FhirVersion::Stu3),
            ("4.0", FhirVersion::R4),
            ("4.0.1", FhirVersion::R4),
            ("4.3", FhirVersion::R4B),
            ("4.3.0", FhirVersion::R4B),
            ("R4B", FhirVersion::R4B),
            ("5.0", FhirVersion::R5),
            ("5.0.0-ballot", FhirVersion::R5),
            (" 5.0.0 ", FhirVersion::R5),
        ] {
            assert_eq!(FhirVersion::parse(text), Some(version), "{text}");
        }
        for bad in [
            "", "3", "3.", "3.1", "2.0", "3.0.x", "4.0.", "R6", "3.0.2.1x", "1.0.2;",
        ] {
            assert_eq!(FhirVersion::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn displays_both_ways_and_round_trips() {
        for version in FhirVersion::ALL {
            assert_eq!(version.to_string().parse::<FhirVersion>().unwrap(), version);
            assert_eq!(format!("{version:#}"), version.release());
            let json = serde_json::to_string(&version).unwrap();
            assert_eq!(serde_json::from_str::<FhirVersion>(&json).unwrap(), version);
        }
        assert!(serde_json::from_str::<FhirVersion>("\"9.9\"").is_err());
    }
}
