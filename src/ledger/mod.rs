//! The application services: recording, reading and reporting on the
//! ledger, independent of HTTP so the CLI and the bench share them.

pub mod consents;
pub mod keys;
pub mod policies;
pub mod reconciliation;
pub mod reports;
pub mod transfers;
