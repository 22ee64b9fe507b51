//! Imports Unleash's client-features JSON (`/api/client/features`) and delta
//! events into the flag model, so Unleash users can migrate and so the engine
//! can be checked against Unleash's client specification.
//!
//! # Mapping
//! - A feature becomes a flag with the same key in the given namespace; its
//!   `description`, `project` (metadata `unleash.project`) and `type`
//!   (metadata `unleash.type`) are kept.
//! - A feature without variants (neither feature nor strategy variants)
//!   becomes a BOOLEAN flag with variants `on` = true and `off` = false: each
//!   strategy becomes a rule serving `on`, the default and disabled variant is
//!   `off`, and a feature without strategies serves `on` (reason STATIC).
//! - A feature with variants becomes a JSON flag. Its variants are the Unleash
//!   variants, each valued with its payload kept as is (`{"type": …,
//!   "value": …}`) or `null`, plus a variant `disabled` (null) that is the
//!   default and disabled variant and is served by a matching strategy when
//!   there is no variant to choose (Unleash's "enabled without variant").
//!   Strategies with variants become rules serving a split of them (stickiness
//!   and group id from the strategy's `stickiness`/`groupId` parameters) and
//!   come first, as Unleash checks them first; other strategies serve a split
//!   of the feature variants (stickiness of the first variant, group = flag
//!   key, overrides kept). Without strategies the flag gets one unconditional
//!   rule serving that split. Two variants with one name but different
//!   payloads are told apart as `name~N`, with metadata
//!   `unleash.variant.name~N` = `name`.
//! - Strategies: `default` (no condition), `userWithId` (userId IN the ids),
//!   `gradualRolloutUserId` / `gradualRolloutSessionId` (rollout sticky on
//!   userId / sessionId with the `groupId`), `gradualRolloutRandom` (random
//!   rollout), `flexibleRollout` (rollout with `stickiness` and `groupId`),
//!   `remoteAddress` (remoteAddress IN_CIDR the `IPs`), `applicationHostname`
//!   (property `hostname` IN the `hostNames`, case-insensitively: the engine
//!   evaluates for a remote caller, which must send its host name). Unknown
//!   strategies, disabled strategies and strategies missing a required
//!   parameter become rules that never match (a 0% random rollout), as Unleash
//!   evaluates them false.
//! - Constraints keep their operator (unknown ones as `Operator::Unknown`,
//!   which never holds), `inverted` and `caseInsensitive` (also for IN and
//!   NOT_IN, as the current client specification has it); single-value
//!   operators read `value` (or the first of `values`). Segment ids become
//!   segment keys `segment-<id>`.
//! - Dependencies become prerequisites (`enabled: false` → `expect_off`). As
//!   in Unleash only one level is followed: a dependency on a feature that has
//!   dependencies itself (or is part of a cycle) becomes a prerequisite on the
//!   impossible key `unleash/transitive/<parent>`, which always fails. A
//!   variant list on a parent without variants is satisfied by `disabled`
//!   (Unleash's variant name for it), so it is dropped when it holds
//!   `disabled`.
//! - Delta events `hydration` (replaces everything), `feature-updated`,
//!   `feature-removed`, `segment-updated` and `segment-removed` apply to a
//!   [`FlagSet`]; unknown event types are skipped.
//!
//! Known difference: Unleash's Rust engine turns a whole feature off when a
//! numeric, date or semver operand does not parse; here only that constraint
//! never holds (as Unleash's Node SDK does). Write-time validation refuses
//! such operands anyway.
//!
//! With that mapping Unleash's `isEnabled` is [`is_enabled`] (reason STATIC,
//! TARGETING_MATCH or SPLIT) and `getVariant` is [`variant`].

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value as Json;

use crate::engine::{Evaluation, FlagSet};
use crate::model::{
    self, Attribute, Constraint, Flag, FlagType, Operator, Override, Prerequisite, Rollout, Rule,
    Serve, Split, Stamp, Stickiness, Value, Variant, WeightedVariant,
};

/// The flags and segments of one client-features document.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Import {
    pub flags: Vec<model::Flag>,
    pub segments: Vec<model::Segment>,
}

/// Why an Unleash document could not be imported.
#[derive(Debug, thiserror::Error)]
pub enum UnleashError {
    /// The document is not JSON of the expected shape.
    #[error("not an Unleash document: {0}")]
    Json(#[from] serde_json::Error),
}

/// Unleash's `getVariant` answer, reconstructed from an evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct UnleashVariant {
    pub name: String,
    /// The payload (`{"type": …, "value": …}`), when the variant has one.
    pub payload: Option<Json>,
    /// Whether a real variant was chosen.
    pub enabled: bool,
    /// Whether the feature is enabled.
    pub feature_enabled: bool,
}

/// Name of the variant of imported JSON flags that stands for "no variant".
pub const DISABLED_VARIANT: &str = "disabled";

/// The segment key an Unleash segment id maps to.
pub fn segment_key(id: i64) -> String {
    format!("segment-{id}")
}

/// Parses a client-features document (`{version, features, segments}`).
pub fn import_features(json: &str, namespace: &str) -> Result<Import, UnleashError> {
    let doc: Features = serde_json::from_str(json)?;
    Ok(import(&doc.features, &doc.segments, namespace))
}

/// Applies a list of delta events (`{"events": [...]}`) to `state`.
pub fn apply_events(json: &str, namespace: &str, state: &mut FlagSet) -> Result<(), UnleashError> {
    let doc: Events = serde_json::from_str(json)?;
    for event in doc.events {
        match event {
            Event::Hydration { features, segments } => {
                let import = import(&features, &segments, namespace);
                *state = FlagSet::new();
                for segment in import.segments {
                    state.upsert_segment(segment);
                }
                for flag in import.flags {
                    state.upsert_flag(flag);
                }
            }
            Event::FeatureUpdated { feature } => {
                let mut flag = convert_feature(&feature, namespace);
                flag.prerequisites = prerequisites(&feature, |name| {
                    if name == feature.name {
                        return Some(ParentView::of(&flag, feature_has_dependencies(&feature)));
                    }
                    state
                        .get(name)
                        .map(|f| ParentView::of(f.source(), !f.source().prerequisites.is_empty()))
                });
                state.upsert_flag(flag);
            }
            Event::FeatureRemoved { feature_name } => {
                state.remove_flag(&feature_name);
            }
            Event::SegmentUpdated { segment } => {
                state.upsert_segment(convert_segment(&segment, namespace))
            }
            Event::SegmentRemoved { segment_id } => {
                state.remove_segment(&segment_key(segment_id));
            }
            Event::Unknown => {}
        }
    }
    Ok(())
}

/// Unleash's `isEnabled` for an evaluation of an imported flag.
pub fn is_enabled(evaluation: &Evaluation<'_>) -> bool {
    evaluation.is_on()
}

/// Unleash's `getVariant` for an evaluation of an imported flag.
pub fn variant(evaluation: &Evaluation<'_>) -> UnleashVariant {
    let disabled = |feature_enabled| UnleashVariant {
        name: DISABLED_VARIANT.to_string(),
        payload: None,
        enabled: false,
        feature_enabled,
    };
    let (Some(flag), Some(name), true) = (evaluation.flag, evaluation.variant, evaluation.is_on())
    else {
        return disabled(false);
    };
    if flag.flag_type() != FlagType::Json || name == DISABLED_VARIANT {
        return disabled(true);
    }
    let payload = match evaluation.value {
        Some(Value::Json(Json::Null)) | None => None,
        Some(Value::Json(v)) => Some(v.clone()),
        Some(_) => None,
    };
    UnleashVariant {
        name: original_name(flag.metadata(), name).to_string(),
        payload,
        enabled: true,
        feature_enabled: true,
    }
}

fn original_name<'a>(metadata: &'a crate::model::Metadata, name: &'a str) -> &'a str {
    metadata
        .get(&format!("{RENAMED_PREFIX}{name}"))
        .map_or(name, String::as_str)
}

const RENAMED_PREFIX: &str = "unleash.variant.";

#[derive(Deserialize)]
struct Features {
    #[serde(default)]
    features: Vec<Feature>,
    #[serde(default)]
    segments: Vec<USegment>,
}

#[derive(Deserialize)]
struct Events {
    #[serde(default)]
    events: Vec<Event>,
}

#[derive(Deserialize)]
#[serde(tag = "type")]
enum Event {
    #[serde(rename = "hydration")]
    Hydration {
        #[serde(default)]
        features: Vec<Feature>,
        #[serde(default)]
        segments: Vec<USegment>,
    },
    #[serde(rename = "feature-updated")]
    FeatureUpdated { feature: Feature },
    #[serde(rename = "feature-removed", rename_all = "camelCase")]
    FeatureRemoved { feature_name: String },
    #[serde(rename = "segment-updated")]
    SegmentUpdated { segment: USegment },
    #[serde(rename = "segment-removed", rename_all = "camelCase")]
    SegmentRemoved { segment_id: i64 },
    #[serde(other)]
    Unknown,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Feature {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    enabled: bool,
    #[serde(default)]
    project: Option<String>,
    #[serde(default, rename = "type")]
    feature_type: Option<String>,
    #[serde(default)]
    strategies: Option<Vec<Strategy>>,
    #[serde(default)]
    variants: Option<Vec<UVariant>>,
    #[serde(default)]
    dependencies: Option<Vec<Dependency>>,
}

#[derive(Deserialize)]
struct Strategy {
    name: String,
    #[serde(default)]
    parameters: Option<HashMap<String, Json>>,
    #[serde(default)]
    constraints: Option<Vec<UConstraint>>,
    #[serde(default)]
    segments: Option<Vec<i64>>,
    #[serde(default)]
    variants: Option<Vec<UVariant>>,
    #[serde(default)]
    disabled: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UConstraint {
    context_name: String,
    operator: String,
    #[serde(default)]
    values: Option<Vec<Json>>,
    #[serde(default)]
    value: Option<Json>,
    #[serde(default)]
    inverted: Option<bool>,
    #[serde(default)]
    case_insensitive: Option<bool>,
}

#[derive(Deserialize)]
struct UVariant {
    name: String,
    #[serde(default)]
    weight: Option<i64>,
    #[serde(default)]
    stickiness: Option<String>,
    #[serde(default)]
    payload: Option<Json>,
    #[serde(default)]
    overrides: Option<Vec<UOverride>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UOverride {
    context_name: String,
    #[serde(default)]
    values: Vec<Json>,
}

#[derive(Deserialize)]
struct Dependency {
    feature: String,
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    variants: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct USegment {
    id: i64,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    constraints: Vec<UConstraint>,
}

fn import(features: &[Feature], segments: &[USegment], namespace: &str) -> Import {
    let mut flags: Vec<Flag> = features
        .iter()
        .map(|f| convert_feature(f, namespace))
        .collect();
    let by_name: HashMap<&str, usize> = features
        .iter()
        .enumerate()
        .map(|(i, f)| (f.name.as_str(), i))
        .collect();
    let prereqs: Vec<Vec<Prerequisite>> = features
        .iter()
        .map(|f| {
            prerequisites(f, |name| {
                by_name
                    .get(name)
                    .map(|&i| ParentView::of(&flags[i], feature_has_dependencies(&features[i])))
            })
        })
        .collect();
    for (flag, p) in flags.iter_mut().zip(prereqs) {
        flag.prerequisites = p;
    }
    Import {
        flags,
        segments: segments
            .iter()
            .map(|s| convert_segment(s, namespace))
            .collect(),
    }
}

fn feature_has_dependencies(f: &Feature) -> bool {
    f.dependencies.as_ref().is_some_and(|d| !d.is_empty())
}

/// What a dependency needs to know about its parent.
struct ParentView {
    has_dependencies: bool,
    boolean: bool,
    /// (internal name, Unleash name) of the parent's variants.
    variants: Vec<(String, String)>,
}

impl ParentView {
    fn of(flag: &Flag, has_dependencies: bool) -> ParentView {
        ParentView {
            has_dependencies,
            boolean: flag.flag_type == FlagType::Boolean,
            variants: flag
                .variants
                .iter()
                .map(|v| {
                    (
                        v.name.clone(),
                        original_name(&flag.metadata, &v.name).to_string(),
                    )
                })
                .collect(),
        }
    }
}

fn prerequisites(
    feature: &Feature,
    parent: impl Fn(&str) -> Option<ParentView>,
) -> Vec<Prerequisite> {
    let Some(deps) = &feature.dependencies else {
        return Vec::new();
    };
    deps.iter()
        .map(|d| {
            let expect_off = !d.enabled.unwrap_or(true);
            let wanted = d.variants.clone().unwrap_or_default();
            match parent(&d.feature) {
                // Unleash follows one level only: a parent with dependencies
                // of its own fails the child.
                Some(p) if p.has_dependencies => Prerequisite {
                    flag: format!("unleash/transitive/{}", d.feature),
                    expect_off: false,
                    variants: Vec::new(),
                },
                Some(p) if p.boolean => Prerequisite {
                    flag: d.feature.clone(),
                    expect_off,
                    variants: if wanted.iter().any(|v| v == DISABLED_VARIANT) {
                        Vec::new()
                    } else {
                        wanted
                    },
                },
                Some(p) => Prerequisite {
                    flag: d.feature.clone(),
                    expect_off,
                    variants: p
                        .variants
                        .iter()
                        .filter(|(_, original)| wanted.contains(original))
                        .map(|(internal, _)| internal.clone())
                        .chain(if wanted.is_empty() {
                            None
                        } else {
                            Some(UNSATISFIABLE.to_string())
                        })
                        .collect(),
                },
                None => Prerequisite {
                    flag: d.feature.clone(),
                    expect_off,
                    variants: wanted,
                },
            }
        })
        .collect()
}

/// Added to a non-empty variant list so that it stays non-empty (and so keeps
/// requiring a variant) even when none of the wanted names exists.
const UNSATISFIABLE: &str = "unleash/no-such-variant";

fn json_to_string(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Null => None,
        other => Some(other.to_string()),
    }
}

fn param(s: &Strategy, name: &str) -> Option<String> {
    s.parameters.as_ref()?.get(name).and_then(json_to_string)
}

/// An Unleash operator by name: the wire operator `OPERATOR_<name>`, or `Unknown`.
fn operator(name: &str) -> Operator {
    crate::pb::Operator::from_str_name(&format!("OPERATOR_{name}"))
        .and_then(|op| Operator::try_from(op).ok())
        .unwrap_or_else(|| Operator::Unknown(name.to_string()))
}

fn convert_constraint(c: &UConstraint) -> Constraint {
    let operator = operator(&c.operator);
    let list = |values: &Option<Vec<Json>>| -> Vec<String> {
        values.iter().flatten().filter_map(json_to_string).collect()
    };
    let single = c.value.as_ref().and_then(json_to_string);
    let values = match operator {
        Operator::In
        | Operator::NotIn
        | Operator::StrContains
        | Operator::StrStartsWith
        | Operator::StrEndsWith
        | Operator::InCidr => match (&c.values, single) {
            (None, Some(v)) => vec![v],
            _ => list(&c.values),
        },
        _ => match single {
            Some(v) => vec![v],
            None => list(&c.values).into_iter().take(1).collect(),
        },
    };
    let case_insensitive = c.case_insensitive.unwrap_or(false);
    Constraint {
        attribute: Attribute::from_name(&c.context_name),
        operator,
        values,
        inverted: c.inverted.unwrap_or(false),
        case_insensitive,
    }
}

fn convert_segment(s: &USegment, namespace: &str) -> model::Segment {
    model::Segment {
        namespace: namespace.to_string(),
        key: segment_key(s.id),
        description: s.name.clone().unwrap_or_default(),
        constraints: s.constraints.iter().map(convert_constraint).collect(),
        stamp: Stamp::default(),
    }
}

fn stickiness(name: Option<&str>) -> Stickiness {
    Stickiness::from_name(name.unwrap_or(""))
}

/// A rollout that never lets anyone through: how strategies Unleash
/// evaluates false are kept (so that the flag does not become "no rules").
fn never() -> Rollout {
    Rollout {
        percentage: 0,
        stickiness: Stickiness::Random,
        group_id: None,
    }
}

fn percentage(s: &Strategy, name: &str) -> Option<u32> {
    param(s, name)
        .and_then(|p| p.trim().parse::<u32>().ok())
        .map(|p| p.min(100))
}

fn csv(list: &str) -> Vec<String> {
    list.split(',').map(|v| v.trim().to_string()).collect()
}

/// The gate of a strategy: extra constraints and an optional rollout.
fn strategy_gate(s: &Strategy) -> (Vec<Constraint>, Option<Rollout>) {
    let constraint = |attribute, operator, values: Vec<String>, case_insensitive| Constraint {
        attribute,
        operator,
        values,
        inverted: false,
        case_insensitive,
    };
    if s.disabled == Some(true) {
        return (Vec::new(), Some(never()));
    }
    match s.name.as_str() {
        "default" => (Vec::new(), None),
        "userWithId" => match param(s, "userIds") {
            Some(ids) => (
                vec![constraint(
                    Attribute::UserId,
                    Operator::In,
                    csv(&ids),
                    false,
                )],
                None,
            ),
            None => (Vec::new(), Some(never())),
        },
        name @ ("gradualRolloutUserId" | "gradualRolloutSessionId") => {
            match (percentage(s, "percentage"), param(s, "groupId")) {
                (Some(percentage), Some(group)) => {
                    let attribute = if name == "gradualRolloutUserId" {
                        Attribute::UserId
                    } else {
                        Attribute::SessionId
                    };
                    let stickiness = Stickiness::Attribute(attribute);
                    (
                        Vec::new(),
                        Some(Rollout {
                            percentage,
                            stickiness,
                            group_id: Some(group),
                        }),
                    )
                }
                _ => (Vec::new(), Some(never())),
            }
        }
        "gradualRolloutRandom" => match percentage(s, "percentage") {
            Some(percentage) => (
                Vec::new(),
                Some(Rollout {
                    percentage,
                    stickiness: Stickiness::Random,
                    group_id: None,
                }),
            ),
            None => (Vec::new(), Some(never())),
        },
        "flexibleRollout" => match percentage(s, "rollout") {
            Some(percentage) => {
                let rollout = Rollout {
                    percentage,
                    stickiness: stickiness(param(s, "stickiness").as_deref()),
                    group_id: param(s, "groupId").filter(|g| !g.is_empty()),
                };
                (Vec::new(), Some(rollout))
            }
            None => (Vec::new(), Some(never())),
        },
        "remoteAddress" => match param(s, "IPs") {
            Some(ips) => (
                vec![constraint(
                    Attribute::RemoteAddress,
                    Operator::InCidr,
                    csv(&ips),
                    false,
                )],
                None,
            ),
            None => (Vec::new(), Some(never())),
        },
        "applicationHostname" => {
            let hosts = csv(&param(s, "hostNames").unwrap_or_default());
            let attribute = Attribute::Property("hostname".to_string());
            (vec![constraint(attribute, Operator::In, hosts, true)], None)
        }
        _ => (Vec::new(), Some(never())),
    }
}

/// Collects a flag's variants, telling apart same-named variants with
/// different payloads.
#[derive(Default)]
struct VariantTable {
    variants: Vec<Variant>,
    renamed: Vec<(String, String)>,
}

impl VariantTable {
    /// The internal name of an Unleash variant, adding it when new.
    fn intern(&mut self, name: &str, payload: &Option<Json>) -> String {
        let value = Value::Json(payload.clone().unwrap_or(Json::Null));
        let mut candidate = name.to_string();
        let mut n = 0;
        loop {
            match self.variants.iter().find(|v| v.name == candidate) {
                None => break,
                Some(v) if v.value == value && (n > 0 || name != DISABLED_VARIANT) => {
                    return candidate;
                }
                Some(_) => {
                    n += 1;
                    candidate = format!("{name}~{n}");
                }
            }
        }
        if n > 0 {
            self.renamed.push((candidate.clone(), name.to_string()));
        }
        self.variants.push(Variant {
            name: candidate.clone(),
            value,
            description: String::new(),
        });
        candidate
    }
}

fn weight(w: Option<i64>) -> u32 {
    w.unwrap_or(0).clamp(0, i64::from(u32::MAX)) as u32
}

fn convert_feature(f: &Feature, namespace: &str) -> Flag {
    let strategies = f.strategies.as_deref().unwrap_or_default();
    let feature_variants = f.variants.as_deref().unwrap_or_default();
    let has_variants = !feature_variants.is_empty()
        || strategies
            .iter()
            .any(|s| s.variants.as_ref().is_some_and(|v| !v.is_empty()));
    let mut metadata = crate::model::Metadata::new();
    if let Some(project) = &f.project {
        metadata.insert("unleash.project".to_string(), project.clone());
    }
    if let Some(t) = &f.feature_type {
        metadata.insert("unleash.type".to_string(), t.clone());
    }
    let rule = |s: &Strategy, serve: Serve| {
        let (mut constraints, rollout) = strategy_gate(s);
        constraints.extend(s.constraints.iter().flatten().map(convert_constraint));
        Rule {
            name: s.name.clone(),
            constraints,
            segments: s
                .segments
                .iter()
                .flatten()
                .map(|&id| segment_key(id))
                .collect(),
            rollout,
            serve,
        }
    };
    let mut flag = Flag {
        namespace: namespace.to_string(),
        key: f.name.clone(),
        description: f.description.clone().unwrap_or_default(),
        flag_type: FlagType::Boolean,
        variants: Vec::new(),
        enabled: f.enabled,
        disabled_variant: String::new(),
        default_variant: String::new(),
        rules: Vec::new(),
        prerequisites: Vec::new(),
        tags: Vec::new(),
        metadata,
        stamp: Stamp::default(),
    };
    if !has_variants {
        flag.variants = vec![
            Variant {
                name: "on".into(),
                value: Value::Bool(true),
                description: String::new(),
            },
            Variant {
                name: "off".into(),
                value: Value::Bool(false),
                description: String::new(),
            },
        ];
        flag.disabled_variant = "off".into();
        flag.default_variant = if strategies.is_empty() { "on" } else { "off" }.into();
        flag.rules = strategies
            .iter()
            .map(|s| rule(s, Serve::Variant("on".into())))
            .collect();
        return flag;
    }
    let mut table = VariantTable::default();
    table.intern(DISABLED_VARIANT, &None);
    let feature_split = (!feature_variants.is_empty()).then(|| {
        let variants = feature_variants
            .iter()
            .map(|v| WeightedVariant {
                variant: table.intern(&v.name, &v.payload),
                weight: weight(v.weight),
            })
            .collect();
        let overrides = feature_variants
            .iter()
            .zip(
                feature_variants
                    .iter()
                    .map(|v| table.intern(&v.name, &v.payload))
                    .collect::<Vec<_>>(),
            )
            .flat_map(|(v, internal)| {
                v.overrides.iter().flatten().map(move |o| Override {
                    attribute: Attribute::from_name(&o.context_name),
                    values: o.values.iter().filter_map(json_to_string).collect(),
                    variant: internal.clone(),
                })
            })
            .collect();
        Serve::Split(Split {
            variants,
            stickiness: stickiness(feature_variants[0].stickiness.as_deref()),
            group_id: None,
            overrides,
        })
    });
    let plain = feature_split
        .clone()
        .unwrap_or_else(|| Serve::Variant(DISABLED_VARIANT.into()));
    let mut with_variants = Vec::new();
    let mut without = Vec::new();
    for s in strategies {
        match s.variants.as_ref().filter(|v| !v.is_empty()) {
            Some(vs) => {
                let split = Split {
                    variants: vs
                        .iter()
                        .map(|v| WeightedVariant {
                            variant: table.intern(&v.name, &v.payload),
                            weight: weight(v.weight),
                        })
                        .collect(),
                    stickiness: stickiness(param(s, "stickiness").as_deref()),
                    group_id: param(s, "groupId").filter(|g| !g.is_empty()),
                    overrides: Vec::new(),
                };
                with_variants.push(rule(s, Serve::Split(split)));
            }
            None => without.push(rule(s, plain.clone())),
        }
    }
    flag.rules = with_variants.into_iter().chain(without).collect();
    if strategies.is_empty() {
        flag.rules.push(Rule {
            name: "no strategies".into(),
            constraints: Vec::new(),
            segments: Vec::new(),
            rollout: None,
            serve: plain,
        });
    }
    flag.flag_type = FlagType::Json;
    flag.disabled_variant = DISABLED_VARIANT.into();
    flag.default_variant = DISABLED_VARIANT.into();
    for (internal, original) in table.renamed {
        flag.metadata
            .insert(format!("{RENAMED_PREFIX}{internal}"), original);
    }
    flag.variants = table.variants;
    flag
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Context;

    /// Imports `features` (a JSON list) and checks `isEnabled` and the
    /// `getVariant` name for each (feature, userId, enabled, variant) case.
    fn check(features: &str, cases: &[(&str, &str, bool, &str)]) {
        let json = format!(r#"{{"version": 2, "features": {features}}}"#);
        let import = import_features(&json, "ns").unwrap();
        let mut set = FlagSet::new();
        for flag in import.flags {
            set.upsert_flag(flag);
        }
        for (feature, user, enabled, variant_name) in cases {
            let ctx = Context {
                user_id: user,
                ..Context::default()
            };
            let e = set.evaluate(feature, &ctx);
            assert_eq!(is_enabled(&e), *enabled, "{feature} for {user:?}");
            assert_eq!(variant(&e).name, *variant_name, "{feature} for {user:?}");
        }
    }

    #[test]
    fn boolean_features() {
        check(
            r#"[
              {"name": "always", "enabled": true, "strategies": []},
              {"name": "off", "enabled": false, "strategies": []},
              {"name": "users", "enabled": true,
               "strategies": [{"name": "userWithId", "parameters": {"userIds": "a, b"}}]},
              {"name": "custom", "enabled": true, "strategies": [{"name": "myOwnStrategy"}]},
              {"name": "no-ids", "enabled": true, "strategies": [{"name": "userWithId"}]},
              {"name": "unknown-op", "enabled": true, "strategies": [{"name": "default",
               "constraints": [{"contextName": "userId", "operator": "SOUNDS_LIKE",
                                "values": ["a"], "inverted": true}]}]}
            ]"#,
            &[
                ("always", "", true, "disabled"),
                ("off", "", false, "disabled"),
                ("users", "b", true, "disabled"),
                ("users", "c", false, "disabled"),
                ("custom", "a", false, "disabled"),
                ("no-ids", "a", false, "disabled"),
                ("unknown-op", "a", false, "disabled"),
                ("missing", "a", false, "disabled"),
            ],
        );
        let import = import_features(
            r#"{"features": [{"name": "always", "enabled": true, "strategies": []}]}"#,
            "ns",
        )
        .unwrap();
        let flag = &import.flags[0];
        assert_eq!(flag.flag_type, FlagType::Boolean);
        assert_eq!(
            (
                flag.default_variant.as_str(),
                flag.disabled_variant.as_str()
            ),
            ("on", "off")
        );
    }

    #[test]
    fn variants_keep_names_and_payloads() {
        let features = r#"[
          {"name": "colors", "enabled": true,
           "strategies": [
             {"name": "default", "constraints": [{"contextName": "userId", "operator": "IN", "values": ["s"]}],
              "variants": [{"name": "blue", "weight": 1, "payload": {"type": "string", "value": "strategy"}}]},
             {"name": "default"}
           ],
           "variants": [{"name": "blue", "weight": 1, "payload": {"type": "string", "value": "feature"},
                         "overrides": [{"contextName": "userId", "values": ["o"]}]}]}
        ]"#;
        check(
            features,
            &[
                ("colors", "s", true, "blue"),
                ("colors", "x", true, "blue"),
                ("colors", "o", true, "blue"),
            ],
        );
        let json = format!(r#"{{"features": {features}}}"#);
        let mut set = FlagSet::new();
        for flag in import_features(&json, "ns").unwrap().flags {
            set.upsert_flag(flag);
        }
        let payload = |user: &str| {
            let ctx = Context {
                user_id: user,
                ..Context::default()
            };
            variant(&set.evaluate("colors", &ctx)).payload.unwrap()["value"].clone()
        };
        assert_eq!(payload("s"), "strategy");
        assert_eq!(payload("x"), "feature");
        let flag = set.get("colors").unwrap();
        assert_eq!(
            flag.metadata()
                .get("unleash.variant.blue~1")
                .map(String::as_str),
            Some("blue")
        );
    }

    #[test]
    fn dependencies_follow_one_level() {
        check(
            r#"[
              {"name": "root", "enabled": true, "strategies": []},
              {"name": "mid", "enabled": true, "strategies": [], "dependencies": [{"feature": "root"}]},
              {"name": "leaf", "enabled": true, "strategies": [], "dependencies": [{"feature": "mid"}]},
              {"name": "wants-off", "enabled": true, "strategies": [],
               "dependencies": [{"feature": "root", "enabled": false}]}
            ]"#,
            &[
                ("mid", "", true, "disabled"),
                ("leaf", "", false, "disabled"),
                ("wants-off", "", false, "disabled"),
            ],
        );
    }

    #[test]
    fn delta_events() {
        let mut set = FlagSet::new();
        apply_events(
            r#"{"events": [
              {"type": "hydration", "eventId": 1,
               "segments": [{"id": 7, "constraints": [{"contextName": "userId", "operator": "IN", "values": ["a"]}]}],
               "features": [{"name": "seg", "enabled": true, "strategies": [{"name": "default", "segments": [7]}]},
                            {"name": "gone", "enabled": true, "strategies": []}]},
              {"type": "feature-removed", "eventId": 2, "featureName": "gone"},
              {"type": "something-new", "eventId": 3}
            ]}"#,
            "ns",
            &mut set,
        )
        .unwrap();
        let on = |set: &FlagSet, key: &str| {
            is_enabled(&set.evaluate(
                key,
                &Context {
                    user_id: "a",
                    ..Context::default()
                },
            ))
        };
        assert!(on(&set, "seg"));
        assert!(set.get("gone").is_none());
        assert_eq!(
            set.segment(&segment_key(7)).map(|s| s.constraints.len()),
            Some(1)
        );
        apply_events(
            r#"{"events": [{"type": "segment-removed", "segmentId": 7}]}"#,
            "ns",
            &mut set,
        )
        .unwrap();
        assert!(!on(&set, "seg"));
        assert!(matches!(
            apply_events("{", "ns", &mut set),
            Err(UnleashError::Json(_))
        ));
        assert!(import_features(r#"{"features": 3}"#, "ns").is_err());
    }
}
