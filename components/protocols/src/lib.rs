//! Wire types exchanged between roles: serde only, no runtime, no I/O.
//!
//! Versioning rule: fields are added with `#[serde(default)]`; nothing is renamed or removed
//! without a new type.
#![forbid(unsafe_code)]

pub mod echo;
