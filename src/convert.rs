//! Conversions between the wire types (`pb`) and the model: `TryFrom<pb::X>`
//! checks what is structural (required fields present, enum values known,
//! value kinds matching the flag type) and names the offending field path;
//! `From<model::X>` goes back and cannot fail.
//!
//! The evaluation side is here too: [`context`] lends a wire context to the
//! engine without copying, and [`evaluation`] turns an engine result into an
//! `EvaluateResponse`; [`append_result`] encodes the same result straight to
//! bytes from pieces prepared per flag ([`EncodedFlag`]), for batches.
//!
//! Rules that need more than one message (references, limits, key syntax,
//! parsable operands) live in `validate`, which runs on the model.
//!
//! Mapping notes, so that readers of the wire format know what to expect:
//! - Empty strings are proto3's "absent": an empty `group_id` is `None`, an
//!   empty `stickiness` is `Stickiness::Default` (written back as `default`).
//! - An empty constraint attribute is refused, except for the date operators
//!   where it means `currentTime` (as the proto documents).
//! - JSON numbers that are whole and within ±2^53 become JSON integers in the
//!   model; others stay floating point. Non-finite numbers are refused.
//! - `model::Operator::Unknown` (kept only by the Unleash importer, refused by
//!   `validate`) is written as `OPERATOR_UNSPECIFIED`.

use std::fmt;

mod encoded;
pub use encoded::{EncodedFlag, append_result};

use crate::engine;
use crate::model;
use crate::pb;
use crate::validate::MAX_JSON_DEPTH;

/// A rejected input: the path of the offending field (proto field names with
/// indices, e.g. `rules[2].constraints[0].values[1]`) and why it was refused.
///
/// Displays as `rules[2].constraints[0].values[1]: "1.x" is not a semantic
/// version`, the message clients get with INVALID_ARGUMENT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted field path from the converted message; empty for the message itself.
    pub path: String,
    /// Why the field was refused, as a sentence fragment without a final period.
    pub reason: String,
}

impl FieldError {
    /// An error for the field at `path` (relative to the message converted).
    pub fn new(path: impl Into<String>, reason: impl Into<String>) -> FieldError {
        FieldError {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// Places this error inside field `field` of an enclosing message.
    pub fn at(mut self, field: &str) -> FieldError {
        self.prepend(field.to_string());
        self
    }

    /// Places this error inside element `index` of repeated field `field`.
    pub fn at_index(mut self, field: &str, index: usize) -> FieldError {
        self.prepend(format!("{field}[{index}]"));
        self
    }

    /// Places this error inside entry `key` of map field `field` (`field` may
    /// be empty for nested JSON objects). The key is quoted and escaped.
    pub fn at_key(mut self, field: &str, key: &str) -> FieldError {
        self.prepend(format!("{field}[{}]", crate::validate::shown(key)));
        self
    }

    /// Joins `prefix` in front of the current path: with a dot before a field
    /// name, without one before an index or key.
    fn prepend(&mut self, mut prefix: String) {
        if !self.path.is_empty() {
            if !self.path.starts_with('[') {
                prefix.push('.');
            }
            prefix.push_str(&self.path);
        }
        self.path = prefix;
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "{}: {}", self.path, self.reason)
        }
    }
}

impl std::error::Error for FieldError {}

/// The name admins see for a flag type, as in `FLAG_TYPE_<NAME>`.
pub fn flag_type_name(flag_type: model::FlagType) -> &'static str {
    match flag_type {
        model::FlagType::Boolean => "BOOLEAN",
        model::FlagType::String => "STRING",
        model::FlagType::Number => "NUMBER",
        model::FlagType::Json => "JSON",
    }
}

/// The `TypedValue` field that carries values of `flag_type`.
pub fn value_field_name(flag_type: model::FlagType) -> &'static str {
    match flag_type {
        model::FlagType::Boolean => "bool_value",
        model::FlagType::String => "string_value",
        model::FlagType::Number => "number_value",
        model::FlagType::Json => "json_value",
    }
}

/// The reason given when a value's kind does not match its flag's type; shared
/// with `validate` so both report the same words.
pub fn type_mismatch_reason(flag_type: model::FlagType, value: &model::Value) -> String {
    format!(
        "expected {} for a {} flag, got {}",
        value_field_name(flag_type),
        flag_type_name(flag_type),
        value_field_name(value.flag_type())
    )
}

/// The reason given for a NaN or infinite number.
pub fn non_finite_reason(number: f64) -> String {
    format!("{number} is not a finite number")
}

/// The reason given for JSON nested deeper than [`MAX_JSON_DEPTH`].
pub fn json_depth_reason() -> String {
    format!("JSON nested deeper than {MAX_JSON_DEPTH} levels")
}

// ---------------------------------------------------------------------------
// pb -> model

impl TryFrom<pb::Namespace> for model::Namespace {
    type Error = FieldError;

    fn try_from(ns: pb::Namespace) -> Result<Self, FieldError> {
        Ok(model::Namespace {
            key: ns.key,
            description: ns.description,
            stamp: ns.stamp.map(model::Stamp::from).unwrap_or_default(),
        })
    }
}

impl From<pb::Stamp> for model::Stamp {
    /// Stamps are server-assigned and ignored on writes, so nothing is refused;
    /// times outside the `i64` millisecond range saturate.
    fn from(stamp: pb::Stamp) -> Self {
        model::Stamp {
            created_revision: stamp.created_revision,
            updated_revision: stamp.updated_revision,
            updated_at_ms: stamp.updated_at.map(timestamp_to_ms).unwrap_or(0),
            updated_by: stamp.updated_by,
        }
    }
}

impl TryFrom<pb::FlagType> for model::FlagType {
    type Error = FieldError;

    fn try_from(flag_type: pb::FlagType) -> Result<Self, FieldError> {
        match flag_type {
            pb::FlagType::Unspecified => Err(FieldError::new("", "required")),
            pb::FlagType::Boolean => Ok(model::FlagType::Boolean),
            pb::FlagType::String => Ok(model::FlagType::String),
            pb::FlagType::Number => Ok(model::FlagType::Number),
            pb::FlagType::Json => Ok(model::FlagType::Json),
        }
    }
}

impl TryFrom<pb::Flag> for model::Flag {
    type Error = FieldError;

    fn try_from(flag: pb::Flag) -> Result<Self, FieldError> {
        let flag_type = pb::FlagType::try_from(flag.r#type)
            .map_err(|_| FieldError::new("", format!("unknown flag type {}", flag.r#type)))
            .and_then(model::FlagType::try_from)
            .map_err(|e| e.at("type"))?;
        let variants: Vec<model::Variant> = list("variants", flag.variants)?;
        for (i, variant) in variants.iter().enumerate() {
            if variant.value.flag_type() != flag_type {
                return Err(FieldError::new(
                    "value",
                    type_mismatch_reason(flag_type, &variant.value),
                )
                .at_index("variants", i));
            }
        }
        Ok(model::Flag {
            namespace: flag.namespace,
            key: flag.key,
            description: flag.description,
            flag_type,
            variants,
            enabled: flag.enabled,
            disabled_variant: flag.disabled_variant,
            default_variant: flag.default_variant,
            rules: list("rules", flag.rules)?,
            prerequisites: flag
                .prerequisites
                .into_iter()
                .map(model::Prerequisite::from)
                .collect(),
            tags: shrunk(flag.tags),
            metadata: flag.metadata.into_iter().collect(),
            stamp: flag.stamp.map(model::Stamp::from).unwrap_or_default(),
        })
    }
}

impl TryFrom<pb::Variant> for model::Variant {
    type Error = FieldError;

    fn try_from(variant: pb::Variant) -> Result<Self, FieldError> {
        let value = variant.value.ok_or_else(|| FieldError::new("", "required"));
        Ok(model::Variant {
            name: variant.name,
            value: value
                .and_then(model::Value::try_from)
                .map_err(|e| e.at("value"))?,
            description: variant.description,
        })
    }
}

impl TryFrom<pb::TypedValue> for model::Value {
    type Error = FieldError;

    fn try_from(value: pb::TypedValue) -> Result<Self, FieldError> {
        use pb::typed_value::Kind;
        match value.kind {
            None => Err(FieldError::new("", "required")),
            Some(Kind::BoolValue(b)) => Ok(model::Value::Bool(b)),
            Some(Kind::StringValue(s)) => Ok(model::Value::String(s)),
            Some(Kind::NumberValue(n)) if n.is_finite() => Ok(model::Value::Number(n)),
            Some(Kind::NumberValue(n)) => {
                Err(FieldError::new("number_value", non_finite_reason(n)))
            }
            Some(Kind::JsonValue(v)) => json_from_pb(v)
                .map(model::Value::Json)
                .map_err(|e| e.at("json_value")),
        }
    }
}

/// Converts a `google.protobuf.Value` into JSON. Refuses non-finite numbers,
/// values without a kind, and nesting deeper than [`MAX_JSON_DEPTH`]; error
/// paths inside the document look like `["items"][3]`.
pub fn json_from_pb(value: prost_types::Value) -> Result<serde_json::Value, FieldError> {
    json_from_pb_at(value, 0)
}

fn json_from_pb_at(
    value: prost_types::Value,
    depth: usize,
) -> Result<serde_json::Value, FieldError> {
    use prost_types::value::Kind;
    match value.kind {
        None => Err(FieldError::new("", "a JSON value must set one kind")),
        Some(Kind::NullValue(_)) => Ok(serde_json::Value::Null),
        Some(Kind::BoolValue(b)) => Ok(serde_json::Value::Bool(b)),
        Some(Kind::StringValue(s)) => Ok(serde_json::Value::String(s)),
        Some(Kind::NumberValue(n)) => json_number(n).map(serde_json::Value::Number),
        Some(Kind::StructValue(s)) => {
            if depth >= MAX_JSON_DEPTH {
                return Err(FieldError::new("", json_depth_reason()));
            }
            let mut map = serde_json::Map::new();
            for (key, field) in s.fields {
                let converted =
                    json_from_pb_at(field, depth + 1).map_err(|e| e.at_key("", &key))?;
                map.insert(key, converted);
            }
            Ok(serde_json::Value::Object(map))
        }
        Some(Kind::ListValue(l)) => {
            if depth >= MAX_JSON_DEPTH {
                return Err(FieldError::new("", json_depth_reason()));
            }
            l.values
                .into_iter()
                .enumerate()
                .map(|(i, v)| json_from_pb_at(v, depth + 1).map_err(|e| e.at_index("", i)))
                .collect::<Result<Vec<_>, _>>()
                .map(serde_json::Value::Array)
        }
    }
}

/// Whole numbers that a double represents exactly become JSON integers, so
/// `{"limit": 10}` reads back as `10` rather than `10.0`.
fn json_number(n: f64) -> Result<serde_json::Number, FieldError> {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if !n.is_finite() {
        return Err(FieldError::new("", non_finite_reason(n)));
    }
    if n.fract() == 0.0 && n.abs() <= EXACT {
        Ok(serde_json::Number::from(n as i64))
    } else {
        serde_json::Number::from_f64(n).ok_or_else(|| FieldError::new("", non_finite_reason(n)))
    }
}

impl TryFrom<pb::Rule> for model::Rule {
    type Error = FieldError;

    fn try_from(rule: pb::Rule) -> Result<Self, FieldError> {
        let serve = rule
            .serve
            .and_then(|s| s.kind)
            .ok_or_else(|| FieldError::new("serve", "required"))?;
        Ok(model::Rule {
            name: rule.name,
            constraints: list("constraints", rule.constraints)?,
            segments: shrunk(rule.segments),
            rollout: rule.rollout.map(model::Rollout::from),
            serve: model::Serve::try_from(pb::Serve { kind: Some(serve) })
                .map_err(|e| e.at("serve"))?,
        })
    }
}

impl From<pb::Rollout> for model::Rollout {
    /// Nothing structural can be wrong with a rollout; its percentage is
    /// checked by `validate`.
    fn from(rollout: pb::Rollout) -> Self {
        model::Rollout {
            percentage: rollout.percentage,
            stickiness: model::Stickiness::from_name(&rollout.stickiness),
            group_id: non_empty(rollout.group_id),
        }
    }
}

impl TryFrom<pb::Serve> for model::Serve {
    type Error = FieldError;

    fn try_from(serve: pb::Serve) -> Result<Self, FieldError> {
        use pb::serve::Kind;
        match serve.kind {
            None => Err(FieldError::new("", "required")),
            Some(Kind::Variant(name)) => Ok(model::Serve::Variant(name)),
            Some(Kind::Split(split)) => model::Split::try_from(split)
                .map(model::Serve::Split)
                .map_err(|e| e.at("split")),
        }
    }
}

impl TryFrom<pb::Split> for model::Split {
    type Error = FieldError;

    fn try_from(split: pb::Split) -> Result<Self, FieldError> {
        Ok(model::Split {
            variants: split
                .variants
                .into_iter()
                .map(model::WeightedVariant::from)
                .collect(),
            stickiness: model::Stickiness::from_name(&split.stickiness),
            group_id: non_empty(split.group_id),
            overrides: list("overrides", split.overrides)?,
        })
    }
}

impl From<pb::WeightedVariant> for model::WeightedVariant {
    fn from(wv: pb::WeightedVariant) -> Self {
        model::WeightedVariant {
            variant: wv.variant,
            weight: wv.weight,
        }
    }
}

impl TryFrom<pb::Override> for model::Override {
    type Error = FieldError;

    fn try_from(o: pb::Override) -> Result<Self, FieldError> {
        if o.attribute.is_empty() {
            return Err(FieldError::new("attribute", "required"));
        }
        Ok(model::Override {
            attribute: model::Attribute::from_name(&o.attribute),
            values: shrunk(o.values),
            variant: o.variant,
        })
    }
}

impl TryFrom<pb::Operator> for model::Operator {
    type Error = FieldError;

    fn try_from(op: pb::Operator) -> Result<Self, FieldError> {
        use model::Operator as M;
        use pb::Operator as P;
        Ok(match op {
            P::Unspecified => return Err(FieldError::new("", "required")),
            P::In => M::In,
            P::NotIn => M::NotIn,
            P::StrContains => M::StrContains,
            P::StrStartsWith => M::StrStartsWith,
            P::StrEndsWith => M::StrEndsWith,
            P::NumEq => M::NumEq,
            P::NumGt => M::NumGt,
            P::NumGte => M::NumGte,
            P::NumLt => M::NumLt,
            P::NumLte => M::NumLte,
            P::DateAfter => M::DateAfter,
            P::DateBefore => M::DateBefore,
            P::SemverEq => M::SemverEq,
            P::SemverGt => M::SemverGt,
            P::SemverGte => M::SemverGte,
            P::SemverLt => M::SemverLt,
            P::SemverLte => M::SemverLte,
            P::Regex => M::Regex,
            P::InCidr => M::InCidr,
        })
    }
}

impl TryFrom<pb::Constraint> for model::Constraint {
    type Error = FieldError;

    fn try_from(c: pb::Constraint) -> Result<Self, FieldError> {
        let operator = pb::Operator::try_from(c.operator)
            .map_err(|_| FieldError::new("", format!("unknown operator {}", c.operator)))
            .and_then(model::Operator::try_from)
            .map_err(|e| e.at("operator"))?;
        let attribute = if c.attribute.is_empty() {
            match operator {
                model::Operator::DateAfter | model::Operator::DateBefore => {
                    model::Attribute::CurrentTime
                }
                _ => return Err(FieldError::new("attribute", "required")),
            }
        } else {
            model::Attribute::from_name(&c.attribute)
        };
        Ok(model::Constraint {
            attribute,
            operator,
            values: shrunk(c.values),
            inverted: c.inverted,
            case_insensitive: c.case_insensitive,
        })
    }
}

impl From<pb::Prerequisite> for model::Prerequisite {
    /// Whether the parent flag exists is for `validate`, which sees the namespace.
    fn from(p: pb::Prerequisite) -> Self {
        model::Prerequisite {
            flag: p.flag,
            expect_off: p.expect_off,
            variants: p.variants,
        }
    }
}

impl TryFrom<pb::Segment> for model::Segment {
    type Error = FieldError;

    fn try_from(segment: pb::Segment) -> Result<Self, FieldError> {
        Ok(model::Segment {
            namespace: segment.namespace,
            key: segment.key,
            description: segment.description,
            constraints: list("constraints", segment.constraints)?,
            stamp: segment.stamp.map(model::Stamp::from).unwrap_or_default(),
        })
    }
}

/// Converts every element of a repeated field, naming the index of the first
/// that fails.
fn list<P, M>(field: &str, items: Vec<P>) -> Result<Vec<M>, FieldError>
where
    M: TryFrom<P, Error = FieldError>,
{
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| M::try_from(item).map_err(|e| e.at_index(field, i)))
        .collect::<Result<Vec<M>, FieldError>>()
        .map(shrunk)
}

/// `items` without spare capacity. Decoded prost lists grow by doubling, and
/// converting in place keeps their buffers, so without this a replica holding
/// 100,000 flags carries tens of megabytes of unused capacity for as long as
/// the flags live.
fn shrunk<T>(mut items: Vec<T>) -> Vec<T> {
    items.shrink_to_fit();
    items
}

fn non_empty(s: String) -> Option<String> {
    if s.is_empty() { None } else { Some(s) }
}

fn timestamp_to_ms(ts: prost_types::Timestamp) -> i64 {
    ts.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(ts.nanos) / 1_000_000)
}

// ---------------------------------------------------------------------------
// model -> pb

impl From<model::Namespace> for pb::Namespace {
    fn from(ns: model::Namespace) -> Self {
        pb::Namespace {
            key: ns.key,
            description: ns.description,
            stamp: stamp_to_pb(ns.stamp),
        }
    }
}

impl From<model::Stamp> for pb::Stamp {
    fn from(stamp: model::Stamp) -> Self {
        pb::Stamp {
            created_revision: stamp.created_revision,
            updated_revision: stamp.updated_revision,
            updated_at: (stamp.updated_at_ms != 0).then(|| ms_to_timestamp(stamp.updated_at_ms)),
            updated_by: stamp.updated_by,
        }
    }
}

impl From<model::FlagType> for pb::FlagType {
    fn from(flag_type: model::FlagType) -> Self {
        match flag_type {
            model::FlagType::Boolean => pb::FlagType::Boolean,
            model::FlagType::String => pb::FlagType::String,
            model::FlagType::Number => pb::FlagType::Number,
            model::FlagType::Json => pb::FlagType::Json,
        }
    }
}

impl From<model::Flag> for pb::Flag {
    fn from(flag: model::Flag) -> Self {
        pb::Flag {
            namespace: flag.namespace,
            key: flag.key,
            description: flag.description,
            r#type: pb::FlagType::from(flag.flag_type) as i32,
            variants: flag.variants.into_iter().map(pb::Variant::from).collect(),
            enabled: flag.enabled,
            disabled_variant: flag.disabled_variant,
            default_variant: flag.default_variant,
            rules: flag.rules.into_iter().map(pb::Rule::from).collect(),
            prerequisites: flag
                .prerequisites
                .into_iter()
                .map(pb::Prerequisite::from)
                .collect(),
            tags: flag.tags,
            metadata: flag.metadata.into_iter().collect(),
            stamp: stamp_to_pb(flag.stamp),
        }
    }
}

impl From<model::Variant> for pb::Variant {
    fn from(variant: model::Variant) -> Self {
        pb::Variant {
            name: variant.name,
            value: Some(pb::TypedValue::from(variant.value)),
            description: variant.description,
        }
    }
}

impl From<model::Value> for pb::TypedValue {
    fn from(value: model::Value) -> Self {
        use pb::typed_value::Kind;
        let kind = match value {
            model::Value::Bool(b) => Kind::BoolValue(b),
            model::Value::String(s) => Kind::StringValue(s),
            model::Value::Number(n) => Kind::NumberValue(n),
            model::Value::Json(v) => Kind::JsonValue(json_to_pb(v)),
        };
        pb::TypedValue { kind: Some(kind) }
    }
}

impl From<&model::Value> for pb::TypedValue {
    /// For evaluation results, which borrow the value from the compiled flag.
    fn from(value: &model::Value) -> Self {
        use pb::typed_value::Kind;
        let kind = match value {
            model::Value::Bool(b) => Kind::BoolValue(*b),
            model::Value::String(s) => Kind::StringValue(s.clone()),
            model::Value::Number(n) => Kind::NumberValue(*n),
            model::Value::Json(v) => Kind::JsonValue(json_ref_to_pb(v)),
        };
        pb::TypedValue { kind: Some(kind) }
    }
}

/// Converts JSON into a `google.protobuf.Value`. Numbers become doubles, so
/// integers beyond ±2^53 lose precision, as in any JSON-over-protobuf mapping.
pub fn json_to_pb(value: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        serde_json::Value::Null => Kind::NullValue(prost_types::NullValue::NullValue as i32),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.into_iter().map(json_to_pb).collect(),
        }),
        serde_json::Value::Object(map) => Kind::StructValue(prost_types::Struct {
            fields: map.into_iter().map(|(k, v)| (k, json_to_pb(v))).collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

/// As [`json_to_pb`], from a borrowed document.
pub fn json_ref_to_pb(value: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        serde_json::Value::Null => Kind::NullValue(prost_types::NullValue::NullValue as i32),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(json_ref_to_pb).collect(),
        }),
        serde_json::Value::Object(map) => Kind::StructValue(prost_types::Struct {
            fields: map
                .iter()
                .map(|(k, v)| (k.clone(), json_ref_to_pb(v)))
                .collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

impl From<model::Rule> for pb::Rule {
    fn from(rule: model::Rule) -> Self {
        pb::Rule {
            name: rule.name,
            constraints: rule
                .constraints
                .into_iter()
                .map(pb::Constraint::from)
                .collect(),
            segments: rule.segments,
            rollout: rule.rollout.map(pb::Rollout::from),
            serve: Some(pb::Serve::from(rule.serve)),
        }
    }
}

impl From<model::Rollout> for pb::Rollout {
    fn from(rollout: model::Rollout) -> Self {
        pb::Rollout {
            percentage: rollout.percentage,
            stickiness: stickiness_to_pb(rollout.stickiness),
            group_id: rollout.group_id.unwrap_or_default(),
        }
    }
}

impl From<model::Serve> for pb::Serve {
    fn from(serve: model::Serve) -> Self {
        use pb::serve::Kind;
        let kind = match serve {
            model::Serve::Variant(name) => Kind::Variant(name),
            model::Serve::Split(split) => Kind::Split(pb::Split::from(split)),
        };
        pb::Serve { kind: Some(kind) }
    }
}

impl From<model::Split> for pb::Split {
    fn from(split: model::Split) -> Self {
        pb::Split {
            variants: split
                .variants
                .into_iter()
                .map(pb::WeightedVariant::from)
                .collect(),
            stickiness: stickiness_to_pb(split.stickiness),
            group_id: split.group_id.unwrap_or_default(),
            overrides: split
                .overrides
                .into_iter()
                .map(pb::Override::from)
                .collect(),
        }
    }
}

impl From<model::WeightedVariant> for pb::WeightedVariant {
    fn from(wv: model::WeightedVariant) -> Self {
        pb::WeightedVariant {
            variant: wv.variant,
            weight: wv.weight,
        }
    }
}

impl From<model::Override> for pb::Override {
    fn from(o: model::Override) -> Self {
        pb::Override {
            attribute: attribute_to_pb(o.attribute),
            values: o.values,
            variant: o.variant,
        }
    }
}

impl From<model::Operator> for pb::Operator {
    /// `Unknown` has no wire form; it becomes UNSPECIFIED, which the reverse
    /// conversion refuses (and `validate` never lets such a flag be stored).
    fn from(op: model::Operator) -> Self {
        use model::Operator as M;
        use pb::Operator as P;
        match op {
            M::In => P::In,
            M::NotIn => P::NotIn,
            M::StrContains => P::StrContains,
            M::StrStartsWith => P::StrStartsWith,
            M::StrEndsWith => P::StrEndsWith,
            M::NumEq => P::NumEq,
            M::NumGt => P::NumGt,
            M::NumGte => P::NumGte,
            M::NumLt => P::NumLt,
            M::NumLte => P::NumLte,
            M::DateAfter => P::DateAfter,
            M::DateBefore => P::DateBefore,
            M::SemverEq => P::SemverEq,
            M::SemverGt => P::SemverGt,
            M::SemverGte => P::SemverGte,
            M::SemverLt => P::SemverLt,
            M::SemverLte => P::SemverLte,
            M::Regex => P::Regex,
            M::InCidr => P::InCidr,
            M::Unknown(_) => P::Unspecified,
        }
    }
}

impl From<model::Constraint> for pb::Constraint {
    fn from(c: model::Constraint) -> Self {
        pb::Constraint {
            attribute: attribute_to_pb(c.attribute),
            operator: pb::Operator::from(c.operator) as i32,
            values: c.values,
            inverted: c.inverted,
            case_insensitive: c.case_insensitive,
        }
    }
}

impl From<model::Prerequisite> for pb::Prerequisite {
    fn from(p: model::Prerequisite) -> Self {
        pb::Prerequisite {
            flag: p.flag,
            expect_off: p.expect_off,
            variants: p.variants,
        }
    }
}

impl From<model::Segment> for pb::Segment {
    fn from(segment: model::Segment) -> Self {
        pb::Segment {
            namespace: segment.namespace,
            key: segment.key,
            description: segment.description,
            constraints: segment
                .constraints
                .into_iter()
                .map(pb::Constraint::from)
                .collect(),
            stamp: stamp_to_pb(segment.stamp),
        }
    }
}

/// A never-written stamp (all zero) goes out as absent, so validate-only
/// responses and exports of unsaved objects do not show a fake epoch time.
fn stamp_to_pb(stamp: model::Stamp) -> Option<pb::Stamp> {
    (stamp != model::Stamp::default()).then(|| pb::Stamp::from(stamp))
}

fn stickiness_to_pb(stickiness: model::Stickiness) -> String {
    match stickiness {
        model::Stickiness::Default => "default".to_string(),
        model::Stickiness::Random => "random".to_string(),
        model::Stickiness::Attribute(attribute) => attribute_to_pb(attribute),
    }
}

fn attribute_to_pb(attribute: model::Attribute) -> String {
    match attribute {
        model::Attribute::Property(name) => name,
        known => known.name().to_string(),
    }
}

fn ms_to_timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

// ---------------------------------------------------------------------------
// Evaluation: wire context in, engine result out.

/// Lends a wire context to the engine. Borrows every string and the property
/// map in place, so building it allocates nothing; an empty property map is
/// passed as `None` so the engine can skip property lookups.
pub fn context(ctx: &pb::Context) -> engine::Context<'_> {
    engine::Context {
        targeting_key: &ctx.targeting_key,
        user_id: &ctx.user_id,
        session_id: &ctx.session_id,
        remote_address: &ctx.remote_address,
        environment: &ctx.environment,
        app_name: &ctx.app_name,
        current_time_ms: ctx.current_time.as_ref().map(|ts| timestamp_to_ms(*ts)),
        properties: (!ctx.properties.is_empty()).then_some(&ctx.properties),
    }
}

impl From<engine::Reason> for pb::Reason {
    fn from(reason: engine::Reason) -> Self {
        match reason {
            engine::Reason::Static => pb::Reason::Static,
            engine::Reason::TargetingMatch => pb::Reason::TargetingMatch,
            engine::Reason::Split => pb::Reason::Split,
            engine::Reason::Default => pb::Reason::Default,
            engine::Reason::Disabled => pb::Reason::Disabled,
            engine::Reason::PrerequisiteFailed => pb::Reason::PrerequisiteFailed,
            engine::Reason::Error => pb::Reason::Error,
        }
    }
}

impl From<engine::ErrorCode> for pb::ErrorCode {
    fn from(code: engine::ErrorCode) -> Self {
        match code {
            engine::ErrorCode::FlagNotFound => pb::ErrorCode::FlagNotFound,
            engine::ErrorCode::TypeMismatch => pb::ErrorCode::TypeMismatch,
            engine::ErrorCode::General => pb::ErrorCode::General,
        }
    }
}

/// Builds the response for evaluating flag `key`: the engine's result plus the
/// replica's applied `revision`. `key` is the key asked for, so a flag that
/// was not found is still named in the response.
///
/// For `TypeMismatch` (which callers set themselves after comparing
/// `expected_type`), the message names the flag's actual type.
pub fn evaluation(key: &str, eval: &engine::Evaluation<'_>, revision: u64) -> pb::EvaluateResponse {
    let flag = eval.flag;
    let error_message = match eval.error {
        None => String::new(),
        Some(engine::ErrorCode::FlagNotFound) => {
            format!("flag {} not found", crate::validate::shown(key))
        }
        Some(engine::ErrorCode::TypeMismatch) => match flag {
            Some(f) => format!(
                "flag {} is a {} flag",
                crate::validate::shown(key),
                flag_type_name(f.flag_type())
            ),
            None => format!(
                "flag {} is not of the expected type",
                crate::validate::shown(key)
            ),
        },
        Some(engine::ErrorCode::General) => format!(
            "flag {} could not be evaluated",
            crate::validate::shown(key)
        ),
    };
    pb::EvaluateResponse {
        flag_key: key.to_string(),
        value: eval.value.map(pb::TypedValue::from),
        variant: eval.variant.unwrap_or_default().to_string(),
        reason: pb::Reason::from(eval.reason) as i32,
        error_code: eval
            .error
            .map_or(pb::ErrorCode::Unspecified, pb::ErrorCode::from) as i32,
        error_message,
        rule_index: rule_index(eval),
        revision,
        ..flag.map(flag_fields).unwrap_or_default()
    }
}

/// `EvaluateResponse.rule_index`: the rule that matched, or -1.
fn rule_index(eval: &engine::Evaluation<'_>) -> i32 {
    eval.rule_index
        .map_or(-1, |i| i32::try_from(i).unwrap_or(i32::MAX))
}

/// The fields of an `EvaluateResponse` that depend on the flag alone: its revision, type and
/// metadata.
fn flag_fields(flag: &engine::CompiledFlag) -> pb::EvaluateResponse {
    pb::EvaluateResponse {
        flag_revision: flag.revision(),
        r#type: pb::FlagType::from(flag.flag_type()) as i32,
        metadata: flag
            .metadata()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        ..Default::default()
    }
}
