//! The domain: what crosses between the platform and its carriers, and the
//! rules that make a transfer lawful. Everything here is validated once, at
//! the edge; past it, code works with types that cannot be invalid.

pub mod consent;
pub mod country;
pub mod fields;
pub mod payload;
pub mod subject;
pub mod transfer;

pub use country::Country;
pub use subject::{PhoneNumber, SipUri, SubjectId};

/// A string-backed enum with `as_str`, `FromStr`, serde and an `ALL` list.
macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord,
                 serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
        pub enum $name { $(#[serde(rename = $s)] $variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $s),+ }
            }
            /// The accepted spellings, for error messages.
            pub fn expected() -> String {
                Self::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", ")
            }
        }

        impl std::str::FromStr for $name {
            type Err = ();
            fn from_str(s: &str) -> Result<Self, ()> {
                match s { $($s => Ok($name::$variant),)+ _ => Err(()) }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use string_enum;

string_enum!(
    /// The categories of personal data that cross, one payload schema each.
    Category {
        NumberAssignment = "number_assignment",
        CallDetailRecord = "call_detail_record",
        CallQuality = "call_quality",
        CallDuration = "call_duration",
    }
);

string_enum!(Direction {
    PlatformToCarrier = "platform_to_carrier",
    CarrierToPlatform = "carrier_to_platform",
});

string_enum!(Purpose {
    ServiceProvisioning = "service_provisioning",
    Troubleshooting = "troubleshooting",
    ServiceOperation = "service_operation",
    UsageReporting = "usage_reporting",
    Reconciliation = "reconciliation",
});

string_enum!(
    /// GDPR Art. 6(1) bases the program relies on.
    LegalBasis {
        Contract = "contract",
        LegalObligation = "legal_obligation",
        LegitimateInterest = "legitimate_interest",
        Consent = "consent",
    }
);

impl Category {
    /// The flow table of SPEC section 1: the one direction a category may
    /// cross in, and the purposes it may serve.
    pub fn flow(self) -> (Direction, &'static [Purpose]) {
        use Purpose::*;
        match self {
            Category::NumberAssignment => (Direction::PlatformToCarrier, &[ServiceProvisioning]),
            Category::CallDetailRecord | Category::CallQuality => (
                Direction::PlatformToCarrier,
                &[Troubleshooting, ServiceOperation],
            ),
            Category::CallDuration => (
                Direction::CarrierToPlatform,
                &[UsageReporting, Reconciliation],
            ),
        }
    }

    /// Categories of personal data, for the Art. 30 record.
    pub fn personal_data(self) -> &'static [&'static str] {
        match self {
            Category::NumberAssignment => {
                &["telephone number", "SIP URI", "customer tenant identifier"]
            }
            Category::CallDetailRecord => &[
                "calling and called numbers or SIP URIs",
                "call identifier",
                "call start and end times and duration",
                "call direction and disconnect reason",
            ],
            Category::CallQuality => &[
                "calling and called numbers or SIP URIs",
                "call identifier",
                "call quality metrics (MOS, jitter, packet loss, round-trip time, codec)",
            ],
            Category::CallDuration => &[
                "calling and called numbers or SIP URIs",
                "call identifier",
                "call start time and duration",
            ],
        }
    }

    /// Categories of data subjects, for the Art. 30 record.
    pub fn data_subjects(self) -> &'static [&'static str] {
        match self {
            Category::NumberAssignment => {
                &["users of the customer tenant to whom a number is assigned"]
            }
            _ => &["callers and called parties of calls through the carrier"],
        }
    }
}

/// Carrier identifiers are opaque, short and ASCII.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct CarrierId(String);

impl CarrierId {
    pub fn parse(s: &str) -> Result<Self, String> {
        fields::check_ident(s, 64)?;
        Ok(Self(s.to_string()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for CarrierId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
