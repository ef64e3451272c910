//! Storage limitation: how long each category may be kept.

pub mod policy;

pub use policy::RetentionPolicy;
