//! Who the caller is (JWT) and what they may do (casbin).

pub mod jwt;
pub mod policy;
pub mod principal;

pub use jwt::{Claims, TokenIssuer, TokenVerifier};
pub use policy::Policy;
pub use principal::Principal;

use crate::domain::string_enum;

string_enum!(Role {
    PrivacyOfficer = "privacy_officer",
    Carrier = "carrier",
    Platform = "platform",
    RetentionSweeper = "retention_sweeper",
    Auditor = "auditor",
    Admin = "admin",
});
