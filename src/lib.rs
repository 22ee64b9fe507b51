//! flagstream's shared core: the protobuf contract, the flag model, write-time
//! validation, the compiled evaluation engine and the Unleash importer.
//!
//! # Layout
//! - [`pb`]: code generated from `proto/` (wire types, tonic clients and servers).
//! - [`model`]: the flag model as plain Rust values; no I/O, no wire types.
//! - [`convert`]: `TryFrom<pb::X>` into the model (errors name the field path)
//!   and `From<model::X>` back.
//! - [`validate`]: write-time rules that need a whole namespace (references,
//!   cycles, limits).
//! - [`digest`]: history positions (a hash chain over committed changes) and
//!   order-independent digests of a whole state, for convergence checks.
//! - [`engine`]: flags compiled into an evaluation form, and evaluation.
//! - [`hash`]: murmur3 x86_32, streaming, as Unleash hashes for stickiness.
//! - [`kit`]: server plumbing shared by flagwrite and flagread (auth, tracing,
//!   metrics endpoint, TLS, reflection, shutdown).
//! - [`unleash`]: Unleash client-features JSON and delta events into the model.
#![forbid(unsafe_code)]

pub mod convert;
pub mod digest;
pub mod engine;
pub mod hash;
pub mod kit;
pub mod model;
pub mod pb;
pub mod unleash;
pub mod validate;
