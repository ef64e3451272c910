//! Storage limitation: how long each category may be kept, the sweeps that
//! delete what expired, and the legal holds that stop them.

pub mod holds;
pub mod policy;
pub mod sweep;

pub use policy::RetentionPolicy;
