//! The evaluation engine: flags compiled into an evaluation form, and
//! evaluation with Unleash's semantics.

pub mod parse;
