//! The serving roles as `ractor` actors bound to the bus. One module per role; each exposes a
//! typed handle and keeps its message enum private.
#![forbid(unsafe_code)]

pub mod echo;
