//! transfer-ledger: the system of record for personal data that crosses
//! between a telecom platform and its carriers.

pub mod app;
pub mod audit;
pub mod auth;
pub mod bench;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod domain;
pub mod error;
pub mod http;
pub mod i18n;
pub mod ledger;
pub mod metrics;
pub mod requests;
pub mod retention;
pub mod storage;
pub mod telemetry;

pub use app::{AppState, Application};
pub use config::Config;
pub use error::{AppError, Result};
