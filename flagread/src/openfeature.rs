//! What flagread's two OpenFeature front ends share: flagd's evaluation protocol over gRPC
//! ([`crate::flagd`]) and OFREP over HTTP ([`crate::ofrep`]). Both choose a namespace from the
//! `flagd-selector` header, let callers without a token read the anonymous namespaces, map an
//! OpenFeature evaluation context (a JSON-like object) onto flagstream's context, and name
//! results with OpenFeature's reasons.
//!
//! # The context
//! - `targetingKey` (a string; absent or null means none) is the targeting key.
//! - `userId`, `sessionId`, `remoteAddress`, `environment`, `appName` fill those fields.
//! - `currentTime` (an RFC 3339 string, as SDKs send dates) is the time date constraints use.
//! - `minRevision` (a number or a decimal string) asks to read at least that revision, as
//!   FlagEval's `min_revision`; it is not a property.
//! - Every other attribute is a property: strings as they are; numbers in the shortest form that
//!   parses back (`42`, `1.5`), which the NUM_ operators read; booleans `true`/`false`; null as
//!   absent. Objects and lists are flattened with dots (`user.plan`, `tags.0`), at most
//!   [`MAX_DEPTH`] levels deep, so constraints can name nested attributes.
//! - FlagEval's context limits apply (64 properties after flattening, keys of 256 bytes, values
//!   of 4,096 bytes); a refusal names the attribute as the caller wrote it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use flagstream::engine::{self, CompiledFlag};
use flagstream::kit::auth::{Authenticator, Identity};
use flagstream::model;
use flagstream::pb;
use flagstream::validate::{self, shown};
use tonic::Status;

use crate::service::EvalError;

/// The header naming the namespace (flagd's selector): `flagSetId=<namespace>` or a bare name.
pub const SELECTOR_HEADER: &str = "flagd-selector";

/// The header asking to read at least a revision, as the context's `minRevision`.
pub const MIN_REVISION_HEADER: &str = "flagstream-min-revision";

/// The deepest nesting of objects and lists in a context that is flattened.
pub const MAX_DEPTH: usize = 8;

/// The name `min_revision` waits and event streams of callers without a token count under;
/// no token can have it (token names have no parentheses).
pub const ANONYMOUS: &str = "(anonymous)";

/// Who may read which namespace through the OpenFeature front ends, and which namespace a call
/// without a selector reads.
#[derive(Debug, Clone)]
pub struct Access {
    /// Checks `authorization` headers (or lets everyone through with `--dev-no-auth`).
    authenticator: Authenticator,
    /// Namespaces readable without a token.
    anonymous: BTreeSet<String>,
    /// The namespace of a call that names none.
    default_namespace: String,
}

/// A caller allowed to read a namespace: the namespace, and the name its waits and streams are
/// counted under.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The namespace read.
    pub namespace: String,
    /// The token's identity; `None` for a caller without one.
    identity: Option<Arc<Identity>>,
}

impl Caller {
    /// The name the caller's waits and streams count under: its token's, or [`ANONYMOUS`].
    pub fn token(&self) -> &str {
        self.identity
            .as_deref()
            .map_or(ANONYMOUS, |i| i.name.as_str())
    }
}

/// Why an OpenFeature call failed; each front end maps it to its protocol's error.
#[derive(Debug, thiserror::Error)]
pub enum OpenFeatureError {
    /// The selector header is malformed or uses a key other than `flagSetId`.
    #[error("{SELECTOR_HEADER}: {0}")]
    Selector(String),
    /// No `authorization` header, and the namespace is not anonymous.
    #[error(
        "namespace {} needs a token: send `authorization: Bearer <token>` of an eval token",
        shown(.0)
    )]
    TokenRequired(String),
    /// The `authorization` header is malformed or names no token.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// The token may not read the namespace.
    #[error(
        "token {token:?} may not evaluate flags of namespace {}",
        shown(namespace)
    )]
    PermissionDenied { token: String, namespace: String },
    /// The context cannot be mapped; the message names the attribute.
    #[error("{0}")]
    Context(String),
    /// No such flag (or no such namespace).
    #[error("flag {} not found in namespace {}", shown(flag), shown(namespace))]
    FlagNotFound { namespace: String, flag: String },
    /// The flag's type is not the one the call resolves.
    #[error("flag {} is of type {actual}, not {wanted}", shown(flag))]
    TypeMismatch {
        flag: String,
        actual: &'static str,
        wanted: &'static str,
    },
    /// The flag is a JSON flag, but the value served is not an object.
    #[error("flag {} served a JSON {kind}, not an object", shown(flag))]
    NotAnObject { flag: String, kind: &'static str },
    /// ResolveInt of a number that is not a whole number within ±(2^53−1).
    #[error(
        "flag {} served {value}, which is not a whole number within ±(2^53−1); resolve it as a float",
        shown(flag)
    )]
    NotAnInteger { flag: String, value: f64 },
    /// The evaluation itself failed (e.g. a rule names a variant the flag lacks).
    #[error("flag {} could not be evaluated: {detail}", shown(flag))]
    Evaluation { flag: String, detail: String },
    /// The replica cannot answer now: no state yet, a revision not reached, load shed, a bound
    /// on held waits reached.
    #[error(transparent)]
    Replica(#[from] EvalError),
}

impl From<OpenFeatureError> for Status {
    fn from(error: OpenFeatureError) -> Status {
        let message = error.to_string();
        match error {
            OpenFeatureError::Selector(_)
            | OpenFeatureError::Context(_)
            | OpenFeatureError::TypeMismatch { .. }
            | OpenFeatureError::NotAnObject { .. }
            | OpenFeatureError::NotAnInteger { .. } => Status::invalid_argument(message),
            OpenFeatureError::TokenRequired(_) | OpenFeatureError::Unauthenticated(_) => {
                Status::unauthenticated(message)
            }
            OpenFeatureError::PermissionDenied { .. } => Status::permission_denied(message),
            OpenFeatureError::FlagNotFound { .. } => Status::not_found(message),
            OpenFeatureError::Evaluation { .. } => Status::internal(message),
            OpenFeatureError::Replica(error) => error.into(),
        }
    }
}

impl Access {
    /// Access checked by `authenticator`, with `anonymous` namespaces readable without a token
    /// and `default_namespace` for calls that name none.
    pub fn new(
        authenticator: Authenticator,
        anonymous: impl IntoIterator<Item = String>,
        default_namespace: String,
    ) -> Access {
        Access {
            authenticator,
            anonymous: anonymous.into_iter().collect(),
            default_namespace,
        }
    }

    /// The namespace a call reads and who reads it, given its `flagd-selector` and
    /// `authorization` header values.
    pub fn admit(
        &self,
        selector: Option<&[u8]>,
        authorization: Option<&[u8]>,
    ) -> Result<Caller, OpenFeatureError> {
        let namespace = match selector {
            Some(value) => namespace_of_selector(value)?,
            None => self.default_namespace.clone(),
        };
        let identity: Option<Arc<Identity>> = self
            .authenticator
            .authenticate_optional(authorization)
            .map_err(OpenFeatureError::Unauthenticated)?;
        match identity {
            Some(identity) if identity.can_eval(&namespace) => Ok(Caller {
                namespace,
                identity: Some(identity),
            }),
            Some(identity) => Err(OpenFeatureError::PermissionDenied {
                token: identity.name.clone(),
                namespace,
            }),
            None if self.anonymous.contains(&namespace) => Ok(Caller {
                namespace,
                identity: None,
            }),
            None => Err(OpenFeatureError::TokenRequired(namespace)),
        }
    }
}

/// The namespace a `flagd-selector` value names: `flagSetId=<namespace>` or a bare name.
fn namespace_of_selector(value: &[u8]) -> Result<String, OpenFeatureError> {
    let value = std::str::from_utf8(value)
        .map_err(|_| OpenFeatureError::Selector("not UTF-8".into()))?
        .trim();
    let namespace = match value.split_once('=') {
        Some((key, namespace)) if key.trim() == "flagSetId" => namespace.trim(),
        Some((key, _)) => {
            return Err(OpenFeatureError::Selector(format!(
                "unknown selector key {} (only flagSetId=<namespace>, or a bare namespace)",
                shown(key.trim())
            )));
        }
        None => value,
    };
    if namespace.is_empty() {
        return Err(OpenFeatureError::Selector("names no namespace".into()));
    }
    if namespace.contains([',', '=']) {
        return Err(OpenFeatureError::Selector(format!(
            "{}: one selector, flagSetId=<namespace>",
            shown(value)
        )));
    }
    Ok(namespace.to_string())
}

// ---------------------------------------------------------------------------
// The evaluation context.

/// A JSON-like value, as a `google.protobuf.Value` or a `serde_json::Value` holds it.
pub enum View<'a, V> {
    Null,
    Bool(bool),
    Number(f64),
    String(&'a str),
    List(&'a [V]),
    Object(Box<dyn Iterator<Item = (&'a String, &'a V)> + 'a>),
}

/// A value an OpenFeature context is made of.
pub trait Attribute: Sized {
    /// What the value is.
    fn view(&self) -> View<'_, Self>;
}

impl Attribute for prost_types::Value {
    fn view(&self) -> View<'_, Self> {
        use prost_types::value::Kind;
        match &self.kind {
            None | Some(Kind::NullValue(_)) => View::Null,
            Some(Kind::BoolValue(b)) => View::Bool(*b),
            Some(Kind::NumberValue(n)) => View::Number(*n),
            Some(Kind::StringValue(s)) => View::String(s),
            Some(Kind::ListValue(list)) => View::List(&list.values),
            Some(Kind::StructValue(object)) => View::Object(Box::new(object.fields.iter())),
        }
    }
}

impl Attribute for serde_json::Value {
    fn view(&self) -> View<'_, Self> {
        use serde_json::Value;
        match self {
            Value::Null => View::Null,
            Value::Bool(b) => View::Bool(*b),
            // Every JSON number is finite and has an f64 (perhaps rounded).
            Value::Number(n) => View::Number(n.as_f64().unwrap_or(f64::NAN)),
            Value::String(s) => View::String(s),
            Value::Array(list) => View::List(list),
            Value::Object(object) => View::Object(Box::new(object.iter())),
        }
    }
}

/// An OpenFeature context mapped onto flagstream's.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Mapped {
    /// The context to evaluate with.
    pub context: pb::Context,
    /// The context's `minRevision`, when given.
    pub min_revision: Option<u64>,
}

/// Maps an OpenFeature context (its attributes in order) onto flagstream's, within FlagEval's
/// limits; a refusal names the attribute as `context.<name>`.
pub fn map_context<'a, V: Attribute + 'a>(
    attributes: impl Iterator<Item = (&'a String, &'a V)>,
) -> Result<Mapped, OpenFeatureError> {
    let mut mapped = Mapped::default();
    for (name, value) in attributes {
        map_attribute(&mut mapped, name, value)?;
    }
    Ok(mapped)
}

/// [`map_context`] of a `google.protobuf.Struct`'s fields, taken by value: string attributes (the
/// common case) move into the context instead of being copied.
pub fn map_struct(
    fields: std::collections::BTreeMap<String, prost_types::Value>,
) -> Result<Mapped, OpenFeatureError> {
    use prost_types::value::Kind;
    let mut mapped = Mapped::default();
    for (name, value) in fields {
        let text = match value.kind {
            Some(Kind::StringValue(text)) => text,
            kind => {
                map_attribute(&mut mapped, &name, &prost_types::Value { kind })?;
                continue;
            }
        };
        let field = match name.as_str() {
            "targetingKey" => &mut mapped.context.targeting_key,
            "userId" => &mut mapped.context.user_id,
            "sessionId" => &mut mapped.context.session_id,
            "remoteAddress" => &mut mapped.context.remote_address,
            "environment" => &mut mapped.context.environment,
            "appName" => &mut mapped.context.app_name,
            "currentTime" | "minRevision" => {
                let value = prost_types::Value {
                    kind: Some(Kind::StringValue(text)),
                };
                map_attribute(&mut mapped, &name, &value)?;
                continue;
            }
            _ => {
                insert_property(&mut mapped.context.properties, name, text)?;
                continue;
            }
        };
        if text.len() > validate::MAX_CONTEXT_VALUE_BYTES {
            return Err(too_long(&name, text.len()));
        }
        *field = text;
    }
    Ok(mapped)
}

/// Maps one attribute of an OpenFeature context into `mapped`.
fn map_attribute<V: Attribute>(
    mapped: &mut Mapped,
    name: &str,
    value: &V,
) -> Result<(), OpenFeatureError> {
    {
        let field = match name {
            "targetingKey" => Some(&mut mapped.context.targeting_key),
            "userId" => Some(&mut mapped.context.user_id),
            "sessionId" => Some(&mut mapped.context.session_id),
            "remoteAddress" => Some(&mut mapped.context.remote_address),
            "environment" => Some(&mut mapped.context.environment),
            "appName" => Some(&mut mapped.context.app_name),
            _ => None,
        };
        if let Some(field) = field {
            *field = match (name, value.view()) {
                (_, View::Null) => String::new(),
                ("targetingKey", View::String(s)) => s.to_string(),
                ("targetingKey", _) => {
                    return Err(refuse(name, "must be a string"));
                }
                (_, view) => scalar(&view).ok_or_else(|| refuse(name, "must be a string"))?,
            };
            if field.len() > validate::MAX_CONTEXT_VALUE_BYTES {
                return Err(too_long(name, field.len()));
            }
            return Ok(());
        }
        match name {
            "currentTime" => {
                mapped.context.current_time = match value.view() {
                    View::Null => None,
                    View::String(s) => Some(timestamp(s).ok_or_else(|| {
                        refuse(
                            name,
                            "must be an RFC 3339 date-time, e.g. 2026-11-30T12:00:00Z",
                        )
                    })?),
                    _ => return Err(refuse(name, "must be an RFC 3339 date-time string")),
                };
            }
            "minRevision" => {
                mapped.min_revision = match value.view() {
                    View::Null => None,
                    View::Number(n) if n >= 0.0 && n.fract() == 0.0 && n < 2f64.powi(64) => {
                        Some(n as u64)
                    }
                    View::String(s) => Some(s.trim().parse().map_err(|_| {
                        refuse(name, "must be a revision: a whole number of at least 0")
                    })?),
                    _ => {
                        return Err(refuse(
                            name,
                            "must be a revision: a whole number of at least 0",
                        ));
                    }
                };
            }
            _ => flatten(&mut mapped.context.properties, name.to_string(), value, 1)?,
        }
    }
    Ok(())
}

/// Adds `value` under `name` to `properties`, flattening objects and lists.
fn flatten<V: Attribute>(
    properties: &mut HashMap<String, String>,
    name: String,
    value: &V,
    depth: usize,
) -> Result<(), OpenFeatureError> {
    let view = value.view();
    let nested = |depth: usize| {
        if depth >= MAX_DEPTH {
            Err(refuse(
                &name,
                &format!("nested more than {MAX_DEPTH} levels deep"),
            ))
        } else {
            Ok(())
        }
    };
    match view {
        View::Null => Ok(()),
        View::List(items) => {
            nested(depth)?;
            for (index, item) in items.iter().enumerate() {
                flatten(properties, format!("{name}.{index}"), item, depth + 1)?;
            }
            Ok(())
        }
        View::Object(fields) => {
            nested(depth)?;
            for (key, item) in fields {
                flatten(properties, format!("{name}.{key}"), item, depth + 1)?;
            }
            Ok(())
        }
        view => {
            let text = scalar(&view).ok_or_else(|| refuse(&name, "must be a finite number"))?;
            insert_property(properties, name, text)
        }
    }
}

/// Adds property `name` = `text`, within the context limits; a name given twice is refused.
fn insert_property(
    properties: &mut HashMap<String, String>,
    name: String,
    text: String,
) -> Result<(), OpenFeatureError> {
    if name.len() > validate::MAX_CONTEXT_KEY_BYTES {
        return Err(OpenFeatureError::Context(format!(
            "context: an attribute name of {} bytes (flattened), at most {} allowed: {}",
            name.len(),
            validate::MAX_CONTEXT_KEY_BYTES,
            shown(&name)
        )));
    }
    if text.len() > validate::MAX_CONTEXT_VALUE_BYTES {
        return Err(too_long(&name, text.len()));
    }
    if properties.len() >= validate::MAX_CONTEXT_PROPERTIES && !properties.contains_key(&name) {
        return Err(OpenFeatureError::Context(format!(
            "context: more than {} attributes (objects and lists count one per value)",
            validate::MAX_CONTEXT_PROPERTIES
        )));
    }
    match properties.entry(name) {
        std::collections::hash_map::Entry::Occupied(entry) => {
            Err(refuse(entry.key(), "given twice (once flattened)"))
        }
        std::collections::hash_map::Entry::Vacant(entry) => {
            entry.insert(text);
            Ok(())
        }
    }
}

/// The revision a call asks to read at least: the context's `minRevision`, else the
/// `flagstream-min-revision` header's value, else 0.
pub fn min_revision(header: Option<&[u8]>, mapped: &Mapped) -> Result<u64, OpenFeatureError> {
    if let Some(revision) = mapped.min_revision {
        return Ok(revision);
    }
    match header {
        None => Ok(0),
        Some(value) => std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| {
                OpenFeatureError::Context(format!(
                    "{MIN_REVISION_HEADER}: must be a revision: a whole number of at least 0"
                ))
            }),
    }
}

/// A scalar as a property value: strings as they are, numbers in the shortest form that parses
/// back (whole numbers without a fraction), booleans as `true`/`false`; `None` for anything
/// else (and for numbers that are not finite).
fn scalar<V>(view: &View<'_, V>) -> Option<String> {
    match view {
        View::String(s) => Some(s.to_string()),
        View::Bool(b) => Some(b.to_string()),
        View::Number(n) if n.is_finite() => Some(number_text(*n)),
        _ => None,
    }
}

/// A number as the NUM_ operators read it: `42` (not `42.0`), `1.5`, `-0.25`.
pub fn number_text(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

/// Parses an RFC 3339 date-time.
fn timestamp(s: &str) -> Option<prost_types::Timestamp> {
    let time = chrono::DateTime::parse_from_rfc3339(s.trim()).ok()?;
    Some(prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: time.timestamp_subsec_nanos() as i32,
    })
}

fn refuse(name: &str, why: &str) -> OpenFeatureError {
    OpenFeatureError::Context(format!("context.{}: {why}", shown(name)))
}

fn too_long(name: &str, len: usize) -> OpenFeatureError {
    refuse(
        name,
        &format!(
            "a value of {len} bytes, at most {} allowed",
            validate::MAX_CONTEXT_VALUE_BYTES
        ),
    )
}

// ---------------------------------------------------------------------------
// Results.

/// The type a resolver asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    Boolean,
    String,
    Float,
    Integer,
    Object,
}

impl Wanted {
    /// The flag type that answers it.
    pub fn flag_type(self) -> model::FlagType {
        match self {
            Wanted::Boolean => model::FlagType::Boolean,
            Wanted::String => model::FlagType::String,
            Wanted::Float | Wanted::Integer => model::FlagType::Number,
            Wanted::Object => model::FlagType::Json,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Wanted::Boolean => "BOOLEAN",
            Wanted::String => "STRING",
            Wanted::Float => "NUMBER (float)",
            Wanted::Integer => "NUMBER (integer)",
            Wanted::Object => "JSON (object)",
        }
    }
}

/// Checks that `flag` can answer `wanted` before it is evaluated.
pub fn check_type(flag: &CompiledFlag, wanted: Wanted) -> Result<(), OpenFeatureError> {
    if flag.flag_type() == wanted.flag_type() {
        Ok(())
    } else {
        Err(OpenFeatureError::TypeMismatch {
            flag: flag.key().to_string(),
            actual: flagstream::convert::flag_type_name(flag.flag_type()),
            wanted: wanted.name(),
        })
    }
}

/// The largest whole number an integer resolver serves, 2^53−1: every whole number up to it is
/// exact in a double.
pub const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;

/// A served value as a whole number, when it is one within ±(2^53−1).
pub fn integer(flag: &str, value: f64) -> Result<i64, OpenFeatureError> {
    if value.fract() == 0.0 && value.abs() <= MAX_SAFE_INTEGER {
        Ok(value as i64)
    } else {
        Err(OpenFeatureError::NotAnInteger {
            flag: flag.to_string(),
            value,
        })
    }
}

/// The object a JSON flag served, or why it is not one.
pub fn object<'v>(
    flag: &str,
    value: &'v serde_json::Value,
) -> Result<&'v serde_json::Map<String, serde_json::Value>, OpenFeatureError> {
    use serde_json::Value;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(OpenFeatureError::NotAnObject {
            flag: flag.to_string(),
            kind: match other {
                Value::Null => "null",
                Value::Bool(_) => "boolean",
                Value::Number(_) => "number",
                Value::String(_) => "string",
                Value::Array(_) => "array",
                Value::Object(_) => "object",
            },
        }),
    }
}

/// A successful evaluation as OpenFeature names it.
#[derive(Debug, Clone, Copy)]
pub struct Outcome<'s> {
    /// The value served.
    pub value: &'s model::Value,
    /// The variant served.
    pub variant: &'s str,
    /// One of `STATIC`, `TARGETING_MATCH`, `SPLIT`, `DEFAULT`, `DISABLED`.
    pub reason: &'static str,
}

/// Names an evaluation of `flag` with OpenFeature's reasons, or says why it failed.
///
/// - A disabled flag and a failed prerequisite are `DISABLED`: flagstream serves the disabled
///   variant's value, which its owner chose.
/// - `STATIC` only when the result cannot depend on the context (providers cache `STATIC`
///   results by flag key alone): a flag without rules whose prerequisites held is `DEFAULT`.
pub fn outcome<'s>(
    flag: &'s CompiledFlag,
    evaluation: &engine::Evaluation<'s>,
) -> Result<Outcome<'s>, OpenFeatureError> {
    use engine::Reason;
    let reason = match evaluation.reason {
        Reason::Static if flag.source().prerequisites.is_empty() => "STATIC",
        Reason::Static | Reason::Default => "DEFAULT",
        Reason::TargetingMatch => "TARGETING_MATCH",
        Reason::Split => "SPLIT",
        Reason::Disabled | Reason::PrerequisiteFailed => "DISABLED",
        Reason::Error => {
            let response = flagstream::convert::evaluation(flag.key(), evaluation, 0);
            return Err(OpenFeatureError::Evaluation {
                flag: flag.key().to_string(),
                detail: response.error_message,
            });
        }
    };
    match (evaluation.value, evaluation.variant) {
        (Some(value), Some(variant)) => Ok(Outcome {
            value,
            variant,
            reason,
        }),
        _ => Err(OpenFeatureError::Evaluation {
            flag: flag.key().to_string(),
            detail: "no value served".into(),
        }),
    }
}

/// The reason a FlagEval result maps to (for comparing the front ends with FlagEval).
pub fn reason_of(reason: pb::Reason, has_prerequisites: bool) -> Option<&'static str> {
    Some(match reason {
        pb::Reason::Static if !has_prerequisites => "STATIC",
        pb::Reason::Static | pb::Reason::Default => "DEFAULT",
        pb::Reason::TargetingMatch => "TARGETING_MATCH",
        pb::Reason::Split => "SPLIT",
        pb::Reason::Disabled | pb::Reason::PrerequisiteFailed => "DISABLED",
        pb::Reason::Error | pb::Reason::Unspecified => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Maps a JSON context, or returns the refusal's message.
    fn check(context: serde_json::Value) -> Result<Mapped, String> {
        let serde_json::Value::Object(map) = context else {
            panic!("a context is an object");
        };
        map_context(map.iter()).map_err(|e| e.to_string())
    }

    fn properties(mapped: &Mapped) -> Vec<(String, String)> {
        let mut all: Vec<_> = mapped.context.properties.clone().into_iter().collect();
        all.sort();
        all
    }

    #[test]
    fn well_known_attributes_fill_the_context_fields() {
        let mapped = check(json!({
            "targetingKey": "user-1", "userId": "u", "sessionId": 7, "remoteAddress": "10.0.0.1",
            "environment": "prod", "appName": "web", "currentTime": "2026-11-30T12:00:00.5Z",
            "minRevision": 12
        }))
        .unwrap();
        let c = &mapped.context;
        assert_eq!(
            (&*c.targeting_key, &*c.user_id, &*c.session_id),
            ("user-1", "u", "7")
        );
        assert_eq!(
            (&*c.remote_address, &*c.environment, &*c.app_name),
            ("10.0.0.1", "prod", "web")
        );
        assert_eq!(
            c.current_time,
            Some(prost_types::Timestamp {
                seconds: 1_796_040_000,
                nanos: 500_000_000
            })
        );
        assert_eq!(mapped.min_revision, Some(12));
        assert!(c.properties.is_empty());
    }

    #[test]
    fn other_attributes_become_properties_as_the_operators_read_them() {
        let mapped = check(json!({
            "plan": "pro", "age": 42, "score": 1.5, "negative": -0.25, "big": 1e20, "beta": true,
            "gone": null, "user": {"tier": "gold", "limits": {"seats": 5}}, "tags": ["a", "b"]
        }))
        .unwrap();
        assert_eq!(
            properties(&mapped),
            [
                ("age", "42"),
                ("beta", "true"),
                ("big", "100000000000000000000"),
                ("negative", "-0.25"),
                ("plan", "pro"),
                ("score", "1.5"),
                ("tags.0", "a"),
                ("tags.1", "b"),
                ("user.limits.seats", "5"),
                ("user.tier", "gold"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
    }

    #[test]
    fn an_absent_or_null_targeting_key_is_none() {
        assert_eq!(check(json!({})).unwrap(), Mapped::default());
        assert_eq!(
            check(json!({"targetingKey": null})).unwrap(),
            Mapped::default()
        );
    }

    #[test]
    fn refusals_name_the_attribute() {
        let cases = [
            (
                json!({"targetingKey": 5}),
                "context.\"targetingKey\": must be a string",
            ),
            (
                json!({"userId": {"a": 1}}),
                "context.\"userId\": must be a string",
            ),
            (
                json!({"currentTime": "yesterday"}),
                "context.\"currentTime\": must be an RFC 3339 date-time",
            ),
            (
                json!({"minRevision": -1}),
                "context.\"minRevision\": must be a revision",
            ),
            (
                json!({"minRevision": "x"}),
                "context.\"minRevision\": must be a revision",
            ),
            (
                json!({"a.b": 1, "a": {"b": 2}}),
                "context.\"a.b\": given twice (once flattened)",
            ),
            (
                json!({"deep": [[[[[[[[1]]]]]]]]}),
                "nested more than 8 levels deep",
            ),
            (
                json!({"plan": "x".repeat(4097)}),
                "context.\"plan\": a value of 4097 bytes, at most 4096 allowed",
            ),
        ];
        for (context, expected) in cases {
            let error = check(context.clone()).expect_err(&context.to_string());
            assert!(error.contains(expected), "{context}: {error}");
        }
        let many: serde_json::Map<String, serde_json::Value> =
            (0..65).map(|i| (format!("k{i}"), json!(i))).collect();
        let error = check(serde_json::Value::Object(many)).unwrap_err();
        assert!(error.contains("more than 64 attributes"), "{error}");
        let wide = json!({"list": (0..65).collect::<Vec<_>>()});
        assert!(check(wide).unwrap_err().contains("more than 64 attributes"));
    }

    #[test]
    fn a_struct_maps_as_the_same_json_does() {
        let json = json!({"targetingKey": "k", "plan": "pro", "n": 3, "o": {"x": [true]}});
        let serde_json::Value::Object(map) = &json else {
            unreachable!()
        };
        let structured: std::collections::BTreeMap<String, prost_types::Value> = map
            .iter()
            .map(|(k, v)| (k.clone(), flagstream::convert::json_ref_to_pb(v)))
            .collect();
        assert_eq!(
            map_context(structured.iter()).unwrap(),
            map_context(map.iter()).unwrap()
        );
        assert_eq!(
            map_struct(structured).unwrap(),
            map_context(map.iter()).unwrap()
        );
    }

    #[test]
    fn selectors_name_a_namespace_or_are_refused() {
        let access = Access::new(
            Authenticator::allow_all(),
            Vec::new(),
            "fallback".to_string(),
        );
        let namespace = |selector: Option<&str>| {
            access
                .admit(selector.map(str::as_bytes), None)
                .map(|c| c.namespace)
                .map_err(|e| e.to_string())
        };
        assert_eq!(namespace(None).unwrap(), "fallback");
        assert_eq!(namespace(Some("flagSetId=prod")).unwrap(), "prod");
        assert_eq!(namespace(Some(" prod ")).unwrap(), "prod");
        assert!(
            namespace(Some("source=x"))
                .unwrap_err()
                .contains("unknown selector key")
        );
        assert!(
            namespace(Some("flagSetId="))
                .unwrap_err()
                .contains("names no namespace")
        );
        assert!(namespace(Some("flagSetId=a,flagSetId=b")).is_err());
    }

    #[test]
    fn without_a_token_only_anonymous_namespaces_are_readable() {
        let tokens = flagstream::kit::auth::Tokens::parse(
            "web eval:prod 0123456789abcdef0123\nall eval fedcba9876543210fedc\n",
        )
        .unwrap();
        let access = Access::new(
            Authenticator::new(tokens),
            vec!["public".to_string()],
            "prod".to_string(),
        );
        let admit = |selector: &str, token: Option<&str>| {
            access
                .admit(Some(selector.as_bytes()), token.map(str::as_bytes))
                .map(|c| c.token().to_string())
                .map_err(|e| Status::from(e).code())
        };
        assert_eq!(admit("public", None).unwrap(), ANONYMOUS);
        assert_eq!(admit("prod", None), Err(tonic::Code::Unauthenticated));
        assert_eq!(
            admit("prod", Some("Bearer 0123456789abcdef0123")).unwrap(),
            "web"
        );
        assert_eq!(
            admit("staging", Some("Bearer 0123456789abcdef0123")),
            Err(tonic::Code::PermissionDenied)
        );
        assert_eq!(
            admit("staging", Some("Bearer fedcba9876543210fedc")).unwrap(),
            "all"
        );
        assert_eq!(
            admit("public", Some("Bearer wrong-wrong-wrong-wrong")),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            admit("public", Some("Basic abc")),
            Err(tonic::Code::Unauthenticated)
        );
    }
}
