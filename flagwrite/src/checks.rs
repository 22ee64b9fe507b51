//! Write-time validation for flagwrite: wire objects are converted into the
//! model (which names the offending field path) and checked by
//! `flagstream::validate` against a view of their namespace. Everything that
//! is stored went through here.

use flagstream::validate::{Element, FieldError, MemoryView};
use flagstream::{model, pb};

use crate::error::Error;

/// The part of a namespace a flag or segment is checked against: the flags
/// reachable through prerequisites (or a whole namespace, for imports) and the
/// segments that exist.
pub type View = MemoryView;

/// Converts and validates a namespace.
pub fn namespace(ns: pb::Namespace, prefix: &str) -> Result<model::Namespace, Error> {
    let ns = model::Namespace::try_from(ns).map_err(|e| invalid(prefix, e))?;
    flagstream::validate::namespace(&ns).map_err(|e| invalid(prefix, e))?;
    Ok(ns)
}

/// Converts a flag (without checking references).
pub fn flag_model(flag: pb::Flag, prefix: &str) -> Result<model::Flag, Error> {
    model::Flag::try_from(flag).map_err(|e| invalid(prefix, e))
}

/// Validates a flag against its namespace.
pub fn flag(flag: &model::Flag, view: &View, prefix: &str) -> Result<(), Error> {
    flagstream::validate::flag(flag, view).map_err(|e| invalid(prefix, e))
}

/// Converts and validates a segment.
pub fn segment(segment: pb::Segment, prefix: &str) -> Result<model::Segment, Error> {
    let segment = segment_model(segment, prefix)?;
    flagstream::validate::segment(&segment).map_err(|e| invalid(prefix, e))?;
    Ok(segment)
}

/// Converts a segment (without validating it).
pub fn segment_model(segment: pb::Segment, prefix: &str) -> Result<model::Segment, Error> {
    model::Segment::try_from(segment).map_err(|e| invalid(prefix, e))
}

/// Validates a whole namespace written at once (an import), naming the
/// element an error is in under `prefix` (e.g. `bundle.flags[2]`).
pub fn bundle(
    flags: &[model::Flag],
    segments: &[model::Segment],
    names: Element,
    prefix: &str,
) -> Result<(), Error> {
    flagstream::validate::bundle_named(flags, segments, names).map_err(|e| invalid(prefix, e))
}

/// Checks the request-wide options.
pub fn comment(comment: &str) -> Result<(), Error> {
    flagstream::validate::comment(comment).map_err(|e| invalid("options", e))
}

/// An INVALID_ARGUMENT error whose path starts with `prefix` (e.g. `flag`).
fn invalid(prefix: &str, error: FieldError) -> Error {
    let error = if prefix.is_empty() {
        error
    } else {
        error.at(prefix)
    };
    Error::Invalid(error.to_string())
}
