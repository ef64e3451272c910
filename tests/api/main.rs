//! API tests: the real server on a random port, on SQLite and PostgreSQL.

mod helpers;

mod audit;
mod auth;
mod cli;
mod consents;
mod encryption;
mod keys;
mod operations;
mod queries;
mod reconciliation;
mod reload;
mod reports;
mod retention;
mod subject_requests;
mod transfers;
