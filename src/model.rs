//! The flag model: namespaces, flags, rules, constraints and segments as plain
//! Rust values, independent of the wire format. Conversions to and from the
//! protobuf types live in `convert`; write-time checks in `validate`; the
//! evaluation form in `engine`.

/// An environment such as `production`; every flag and segment lives in one.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Namespace {
    /// Unique key, e.g. `production`.
    pub key: String,
    /// Free text for humans.
    pub description: String,
    /// Server-assigned bookkeeping.
    pub stamp: Stamp,
}

/// Server-assigned bookkeeping carried by every stored object.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stamp {
    /// Revision of the write that created the object.
    pub created_revision: u64,
    /// Revision of the write that last changed the object; the optimistic
    /// concurrency token.
    pub updated_revision: u64,
    /// Wall-clock time of the last change, in milliseconds since the Unix epoch.
    pub updated_at_ms: i64,
    /// Name of the token that made the last change.
    pub updated_by: String,
}

/// The type of every variant value of a flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlagType {
    Boolean,
    String,
    Number,
    Json,
}

/// A typed flag value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Bool(bool),
    String(String),
    Number(f64),
    Json(serde_json::Value),
}

impl Value {
    /// The flag type this value belongs to.
    pub fn flag_type(&self) -> FlagType {
        match self {
            Value::Bool(_) => FlagType::Boolean,
            Value::String(_) => FlagType::String,
            Value::Number(_) => FlagType::Number,
            Value::Json(_) => FlagType::Json,
        }
    }
}

/// One of the values a flag can serve, under a name.
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    /// Unique within the flag; returned with every evaluation.
    pub name: String,
    /// The value served.
    pub value: Value,
    /// Free text for humans.
    pub description: String,
}

/// A feature flag. See `proto/flagstream/v1/types.proto` for the evaluation
/// order this model encodes.
#[derive(Debug, Clone, PartialEq)]
pub struct Flag {
    /// The namespace the flag lives in.
    pub namespace: String,
    /// Unique key within the namespace.
    pub key: String,
    /// Free text for humans.
    pub description: String,
    /// The type of every variant value.
    pub flag_type: FlagType,
    /// What the flag can serve, in declaration order.
    pub variants: Vec<Variant>,
    /// The kill switch: false serves `disabled_variant` to everyone.
    pub enabled: bool,
    /// Served while disabled or when a prerequisite fails.
    pub disabled_variant: String,
    /// Served when enabled and no rule matches (or there are no rules).
    pub default_variant: String,
    /// Targeting rules; the first that matches decides.
    pub rules: Vec<Rule>,
    /// Other flags that must be on (or off) first.
    pub prerequisites: Vec<Prerequisite>,
    /// Labels for filtering.
    pub tags: Vec<String>,
    /// Free metadata (owner, ticket…), returned with evaluations.
    pub metadata: Metadata,
    /// Server-assigned bookkeeping.
    pub stamp: Stamp,
}

/// A flag's free metadata: pairs sorted by key, each key once.
///
/// A sorted boxed slice rather than a `BTreeMap`: a map's first node costs about 550 bytes even
/// for one entry, which came to 55 MB for a replica holding 100,000 flags. Lookups are binary
/// searches; edits rebuild the slice, which suits metadata that is written rarely and small
/// (at most `validate::MAX_METADATA_ENTRIES` entries).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Metadata(Box<[(String, String)]>);

/// A targeting rule: constraints AND segments AND rollout, then serve.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Optional label for humans and metrics.
    pub name: String,
    /// All must hold.
    pub constraints: Vec<Constraint>,
    /// Keys of segments of the same namespace; all must match.
    pub segments: Vec<String>,
    /// Optional sticky percentage gate.
    pub rollout: Option<Rollout>,
    /// What the rule serves when it matches.
    pub serve: Serve,
}

/// A sticky percentage gate with Unleash's `flexibleRollout` hashing.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    /// 0 to 100.
    pub percentage: u32,
    /// Which value is hashed.
    pub stickiness: Stickiness,
    /// Hash group; `None` means the flag key.
    pub group_id: Option<String>,
}

/// Which context value a rollout or split hashes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Stickiness {
    /// userId, then sessionId, then a random value.
    Default,
    /// A random value on every evaluation.
    Random,
    /// One attribute; a missing value closes a rollout gate.
    Attribute(Attribute),
}

/// What a matching rule serves.
#[derive(Debug, Clone, PartialEq)]
pub enum Serve {
    /// One variant, by name.
    Variant(String),
    /// A sticky weighted choice.
    Split(Split),
}

/// A sticky weighted choice among variants (Unleash's variant algorithm).
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    /// Variants and weights, in order.
    pub variants: Vec<WeightedVariant>,
    /// Which value is hashed.
    pub stickiness: Stickiness,
    /// Hash group; `None` means the flag key.
    pub group_id: Option<String>,
    /// Fixed assignments checked before hashing.
    pub overrides: Vec<Override>,
}

/// One entry of a split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightedVariant {
    /// Name of a variant of the flag.
    pub variant: String,
    /// Relative weight.
    pub weight: u32,
}

/// Serves `variant` when `attribute` is one of `values`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override {
    pub attribute: Attribute,
    pub values: Vec<String>,
    pub variant: String,
}

/// A condition on one context attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Constraint {
    /// The attribute compared.
    pub attribute: Attribute,
    /// How it is compared.
    pub operator: Operator,
    /// The operands, as written (parsed once by the engine).
    pub values: Vec<String>,
    /// Negates the result (after a missing attribute made it false).
    pub inverted: bool,
    /// Case-insensitive string comparison.
    pub case_insensitive: bool,
}

/// A context attribute, resolved from its name once.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Attribute {
    TargetingKey,
    UserId,
    SessionId,
    RemoteAddress,
    Environment,
    AppName,
    CurrentTime,
    /// A free property of the context, by name.
    Property(String),
}

impl Stickiness {
    /// Resolves a stickiness name: empty or `default`, `random`, or an attribute name.
    pub fn from_name(name: &str) -> Stickiness {
        match name {
            "" | "default" => Stickiness::Default,
            "random" => Stickiness::Random,
            other => Stickiness::Attribute(Attribute::from_name(other)),
        }
    }
}

impl Attribute {
    /// Resolves an attribute name as used in constraints and stickiness.
    pub fn from_name(name: &str) -> Attribute {
        match name {
            "targetingKey" => Attribute::TargetingKey,
            "userId" => Attribute::UserId,
            "sessionId" => Attribute::SessionId,
            "remoteAddress" => Attribute::RemoteAddress,
            "environment" => Attribute::Environment,
            "appName" => Attribute::AppName,
            "currentTime" => Attribute::CurrentTime,
            other => Attribute::Property(other.to_string()),
        }
    }

    /// The attribute's name, the inverse of `from_name`.
    pub fn name(&self) -> &str {
        match self {
            Attribute::TargetingKey => "targetingKey",
            Attribute::UserId => "userId",
            Attribute::SessionId => "sessionId",
            Attribute::RemoteAddress => "remoteAddress",
            Attribute::Environment => "environment",
            Attribute::AppName => "appName",
            Attribute::CurrentTime => "currentTime",
            Attribute::Property(name) => name,
        }
    }
}

/// Constraint operators, with Unleash's semantics.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Operator {
    In,
    NotIn,
    StrContains,
    StrStartsWith,
    StrEndsWith,
    NumEq,
    NumGt,
    NumGte,
    NumLt,
    NumLte,
    DateAfter,
    DateBefore,
    SemverEq,
    SemverGt,
    SemverGte,
    SemverLt,
    SemverLte,
    Regex,
    InCidr,
    /// An operator this version does not know, kept by the Unleash importer
    /// so that evaluation matches Unleash (the constraint never holds).
    /// Write-time validation refuses it.
    Unknown(String),
}

/// A dependency on another flag of the same namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prerequisite {
    /// Key of the parent flag.
    pub flag: String,
    /// When true the parent must be off instead of on.
    pub expect_off: bool,
    /// When non-empty, the parent must have served one of these variants.
    pub variants: Vec<String>,
}

/// A named, reusable set of constraints.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub namespace: String,
    pub key: String,
    pub description: String,
    /// All must hold.
    pub constraints: Vec<Constraint>,
    pub stamp: Stamp,
}

impl Metadata {
    /// No metadata.
    pub fn new() -> Metadata {
        Metadata::default()
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&String> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| &self.0[i].1)
    }

    /// Sets `key` to `value`, returning the value it replaces.
    pub fn insert(&mut self, key: String, value: String) -> Option<String> {
        let mut entries = std::mem::take(&mut self.0).into_vec();
        let replaced = match entries.binary_search_by(|(k, _)| k.cmp(&key)) {
            Ok(i) => Some(std::mem::replace(&mut entries[i].1, value)),
            Err(i) => {
                entries.insert(i, (key, value));
                None
            }
        };
        self.0 = entries.into_boxed_slice();
        replaced
    }

    /// The entries in key order.
    pub fn iter(&self) -> MetadataIter<'_> {
        self.0
            .iter()
            .map(pair as fn(&'_ (String, String)) -> (&'_ String, &'_ String))
    }
}

/// A stored entry as a pair of references, the item type of a `BTreeMap`'s iterator.
fn pair(entry: &(String, String)) -> (&String, &String) {
    (&entry.0, &entry.1)
}

/// The iterator of [`Metadata::iter`]: `(key, value)` in key order.
pub type MetadataIter<'a> = std::iter::Map<
    std::slice::Iter<'a, (String, String)>,
    fn(&'a (String, String)) -> (&'a String, &'a String),
>;

impl FromIterator<(String, String)> for Metadata {
    /// Sorts the pairs by key; of repeated keys the last one wins, as with a map.
    fn from_iter<I: IntoIterator<Item = (String, String)>>(pairs: I) -> Metadata {
        let mut pairs: Vec<(String, String)> = pairs.into_iter().collect();
        // A stable sort keeps repeated keys in their given order, so the last is kept below.
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        let mut entries: Vec<(String, String)> = Vec::with_capacity(pairs.len());
        for (key, value) in pairs {
            match entries.last_mut() {
                Some(last) if last.0 == key => last.1 = value,
                _ => entries.push((key, value)),
            }
        }
        Metadata(entries.into_boxed_slice())
    }
}

impl<const N: usize> From<[(String, String); N]> for Metadata {
    fn from(pairs: [(String, String); N]) -> Metadata {
        pairs.into_iter().collect()
    }
}

impl IntoIterator for Metadata {
    type Item = (String, String);
    type IntoIter = std::vec::IntoIter<(String, String)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_vec().into_iter()
    }
}

impl<'a> IntoIterator for &'a Metadata {
    type Item = (&'a String, &'a String);
    type IntoIter = MetadataIter<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::Metadata;

    /// Builds metadata from `pairs` and compares its entries, in order, with `expected`.
    fn check(pairs: &[(&str, &str)], expected: &[(&str, &str)]) {
        let metadata: Metadata = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let entries: Vec<(&str, &str)> = metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(entries, expected, "from {pairs:?}");
        for (key, value) in expected {
            assert_eq!(metadata.get(key).map(String::as_str), Some(*value));
        }
        let mut inserted = Metadata::new();
        for (key, value) in pairs {
            inserted.insert(key.to_string(), value.to_string());
        }
        assert_eq!(
            inserted, metadata,
            "insert agrees with collect for {pairs:?}"
        );
    }

    #[test]
    fn metadata_is_sorted_by_key_and_the_last_value_wins() {
        check(&[], &[]);
        check(&[("owner", "ana")], &[("owner", "ana")]);
        check(
            &[("ticket", "T-1"), ("owner", "ana"), ("area", "web")],
            &[("area", "web"), ("owner", "ana"), ("ticket", "T-1")],
        );
        check(
            &[("owner", "ana"), ("team", "x"), ("owner", "bo")],
            &[("owner", "bo"), ("team", "x")],
        );
        assert_eq!(Metadata::new().get("owner"), None);
    }
}
