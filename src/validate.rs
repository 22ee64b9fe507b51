//! Write-time rules, run on the model before anything is stored: key syntax,
//! operands that must parse, references to variants, segments and other
//! flags, and the documented size limits. Every failure is a `FieldError`
//! naming the field path, so admins see exactly what to fix.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use crate::engine::parse;
use crate::{convert, model, pb};

pub use crate::convert::FieldError;

// ---------------------------------------------------------------------------
// Limits. Each matches the comment on its field in `proto/flagstream/v1/`.

/// Largest encoded gRPC request either server accepts, in bytes (4 MiB).
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// Longest namespace key, in characters (all ASCII).
pub const MAX_NAMESPACE_KEY_LEN: usize = 63;
/// Longest flag or segment key, in bytes of UTF-8.
pub const MAX_KEY_BYTES: usize = 256;
/// Longest namespace or variant description, in bytes.
pub const MAX_SHORT_DESCRIPTION_BYTES: usize = 1024;
/// Longest flag or segment description, in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 4096;
/// Most variants per flag.
pub const MAX_VARIANTS: usize = 100;
/// Longest variant name, in bytes.
pub const MAX_VARIANT_NAME_BYTES: usize = 256;
/// Longest STRING flag value, in bytes (64 KiB).
pub const MAX_STRING_VALUE_BYTES: usize = 64 * 1024;
/// Deepest JSON value: objects and arrays nested at most this many levels.
///
/// Derived from prost's decoder, which refuses messages nested more than 100
/// deep: a JSON object level is two messages (`Struct`, `Value`), and the
/// deepest message a flag travels in puts its first `Value` 6 levels down
/// (`SyncMessage` → `Change` → `Delta` → `Flag` → `Variant` → `TypedValue`,
/// and the change log's `LogRecord` → `HistoryEntry` → `Object` → … as
/// deep). At 31 levels every message decodes; at 32 a `CreateFlagRequest`
/// still decodes, so it is refused by name, but a replication `Change` would
/// not. `tests/wire_limits.rs` checks both against every message.
pub const MAX_JSON_DEPTH: usize = 31;
/// Most rules per flag.
pub const MAX_RULES: usize = 200;
/// Longest rule name, in bytes.
pub const MAX_RULE_NAME_BYTES: usize = 128;
/// Most constraints per rule or segment.
pub const MAX_CONSTRAINTS: usize = 100;
/// Most values per constraint or override.
pub const MAX_VALUES: usize = 1000;
/// Longest constraint or override value, in bytes.
pub const MAX_VALUE_BYTES: usize = 4096;
/// Most segment references per rule.
pub const MAX_RULE_SEGMENTS: usize = 20;
/// Most prerequisites per flag.
pub const MAX_PREREQUISITES: usize = 20;
/// Longest chain of prerequisites below a flag (parent, grandparent, …) that
/// the engine evaluates; longer chains would always fail, so they are refused.
pub const MAX_PREREQUISITE_CHAIN: u32 = crate::engine::MAX_PREREQUISITE_DEPTH - 1;
/// Most prerequisite evaluations (counted with repeats) one evaluation of a
/// flag may need, the engine's budget.
pub const MAX_PREREQUISITE_EVALUATIONS: u32 = crate::engine::MAX_PREREQUISITE_EVALUATIONS;
/// Most tags per flag.
pub const MAX_TAGS: usize = 32;
/// Longest tag, in bytes (tags are 1 to this many bytes).
pub const MAX_TAG_BYTES: usize = 64;
/// Most metadata entries per flag.
pub const MAX_METADATA_ENTRIES: usize = 64;
/// Longest metadata key, in bytes.
pub const MAX_METADATA_KEY_BYTES: usize = 128;
/// Longest metadata value, in bytes.
pub const MAX_METADATA_VALUE_BYTES: usize = 1024;
/// Largest rollout percentage.
pub const MAX_PERCENTAGE: u32 = 100;
/// Largest sum of the weights of one split (Unleash's are out of 1,000).
pub const MAX_TOTAL_WEIGHT: u64 = 1_000_000;
/// Longest write comment (`WriteOptions.comment`), in bytes.
pub const MAX_COMMENT_BYTES: usize = 1024;
/// Most memory one compiled regular expression (a REGEX constraint value)
/// may take, in bytes (256 KiB); [`parse::REGEX_SIZE_LIMIT`] says how it is
/// measured and why this much.
pub const MAX_REGEX_BYTES: usize = parse::REGEX_SIZE_LIMIT;
/// Most memory the distinct compiled regexes of one flag or segment may take
/// together, in bytes (1 MiB: four regexes at the limit, or about a hundred
/// everyday ones). Every replica holds them; before this budget one 22 KB
/// request of 2,000 regexes grew each replica by 2.7 GB. Identical patterns
/// (and case-insensitivity) in one object count once, as they are compiled
/// once.
pub const MAX_OBJECT_REGEX_BYTES: usize = 1024 * 1024;
/// Most memory the compiled regexes of one namespace's flags and segments may
/// take together, in bytes (32 MiB), each object's distinct patterns counted
/// as in [`MAX_OBJECT_REGEX_BYTES`]. It bounds what one namespace costs every
/// replica, and what the writer compiles to count it (about two seconds in a
/// debug build, once per namespace after a start).
pub const MAX_NAMESPACE_REGEX_BYTES: usize = 32 * 1024 * 1024;

/// Most free properties in an evaluation context.
pub const MAX_CONTEXT_PROPERTIES: usize = 64;
/// Longest context property key, in bytes.
pub const MAX_CONTEXT_KEY_BYTES: usize = 256;
/// Longest context field or property value, in bytes.
pub const MAX_CONTEXT_VALUE_BYTES: usize = 4096;
/// Most flag keys in one `EvaluateBatch` call.
pub const MAX_BATCH_KEYS: usize = 1000;
/// Most flag keys one `Watch` stream follows.
pub const MAX_WATCH_KEYS: usize = 1000;

/// Longest part of a caller's value an error message quotes, in bytes: a message echoes a short
/// prefix of a long key, not all of it (a status over 8 KiB of headers is refused by default
/// gRPC clients).
pub const MAX_SHOWN_BYTES: usize = 64;

/// A caller's value as error messages quote it: quoted and escaped like `{:?}`, and cut to its
/// first [`MAX_SHOWN_BYTES`] bytes (at a character boundary) with its full length when longer,
/// e.g. `"kkkk…" (10000 bytes)`.
pub fn shown(value: &str) -> Shown<'_> {
    Shown(value)
}

/// See [`shown`].
#[derive(Clone, Copy)]
pub struct Shown<'a>(&'a str);

impl std::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let value = self.0;
        if value.len() <= MAX_SHOWN_BYTES {
            return write!(f, "{value:?}");
        }
        let mut cut = MAX_SHOWN_BYTES;
        while !value.is_char_boundary(cut) {
            cut -= 1;
        }
        let quoted = format!("{:?}", &value[..cut]);
        write!(
            f,
            "{}…\" ({} bytes)",
            &quoted[..quoted.len() - 1],
            value.len()
        )
    }
}

impl std::fmt::Debug for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

// ---------------------------------------------------------------------------
// The namespace a write lands in.

/// What validation needs to know about the rest of a namespace: which segments
/// exist, and the flags other flags can depend on (for missing parents,
/// parent variants and cycles).
///
/// The view is of the namespace as it is before the write; the object being
/// validated takes the place of any stored version of itself.
pub trait NamespaceView {
    /// Whether a segment with this key exists in the namespace.
    fn segment_exists(&self, key: &str) -> bool;
    /// The flag with this key, if it exists. A `Cow` lets in-memory views lend
    /// their flags and stores hand out decoded copies.
    fn flag(&self, key: &str) -> Option<Cow<'_, model::Flag>>;
    /// The memory the compiled regexes of the namespace's other flags and
    /// segments take (all but the object being validated), counted as
    /// [`flag_regex_bytes`] counts it, for [`MAX_NAMESPACE_REGEX_BYTES`].
    /// A view that does not know says 0.
    fn regex_bytes(&self) -> usize {
        0
    }
}

/// A namespace held in memory: the view for tests, dry runs and imports.
#[derive(Debug, Clone, Default)]
pub struct MemoryView {
    /// Flags by key.
    pub flags: HashMap<String, model::Flag>,
    /// Keys of the segments that exist.
    pub segments: HashSet<String>,
    /// What [`NamespaceView::regex_bytes`] answers: set by whoever knows the
    /// rest of the namespace.
    pub regex_bytes: usize,
}

impl NamespaceView for MemoryView {
    fn segment_exists(&self, key: &str) -> bool {
        self.segments.contains(key)
    }

    fn flag(&self, key: &str) -> Option<Cow<'_, model::Flag>> {
        self.flags.get(key).map(Cow::Borrowed)
    }

    fn regex_bytes(&self) -> usize {
        self.regex_bytes
    }
}

/// A compiled namespace is a view too: a writer or replica that keeps one per
/// namespace can validate against it directly.
impl NamespaceView for crate::engine::FlagSet {
    fn segment_exists(&self, key: &str) -> bool {
        self.segment(key).is_some()
    }

    fn flag(&self, key: &str) -> Option<Cow<'_, model::Flag>> {
        self.get(key)
            .map(|compiled| Cow::Borrowed(compiled.source()))
    }
}

// ---------------------------------------------------------------------------
// Entry points.

/// Checks a namespace before it is created: key syntax and description length.
pub fn namespace(ns: &model::Namespace) -> Result<(), FieldError> {
    namespace_key(&ns.key).map_err(|e| e.at("key"))?;
    max_bytes(&ns.description, MAX_SHORT_DESCRIPTION_BYTES).map_err(|e| e.at("description"))
}

/// Checks the syntax of a namespace key: 1 to 63 characters of `a-z`, `0-9`,
/// `.`, `_` and `-`, starting with a letter or digit.
pub fn namespace_key(key: &str) -> Result<(), FieldError> {
    let valid_char =
        |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-');
    let bytes = key.as_bytes();
    if key.is_empty() {
        return Err(FieldError::new("", "required"));
    }
    let starts_alphanumeric = bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit();
    if bytes.len() > MAX_NAMESPACE_KEY_LEN
        || !starts_alphanumeric
        || !bytes.iter().all(|&b| valid_char(b))
    {
        return Err(FieldError::new(
            "",
            format!(
                "{key:?} is not a namespace key: 1 to {MAX_NAMESPACE_KEY_LEN} characters of a-z, 0-9, \
                 '.', '_' and '-', starting with a letter or digit"
            ),
        ));
    }
    Ok(())
}

/// Checks the syntax of a flag or segment key: 1 to 256 bytes of UTF-8 without
/// whitespace, control characters or `/`.
pub fn object_key(key: &str) -> Result<(), FieldError> {
    if key.is_empty() {
        return Err(FieldError::new("", "required"));
    }
    max_bytes(key, MAX_KEY_BYTES)?;
    if key
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '/')
    {
        return Err(FieldError::new(
            "",
            format!(
                "{} is not a key: whitespace, control characters and '/' are not allowed",
                shown(key)
            ),
        ));
    }
    Ok(())
}

/// Checks a flag before it is stored, against the namespace it lands in.
pub fn flag(flag: &model::Flag, ns: &dyn NamespaceView) -> Result<(), FieldError> {
    flag_measured(flag, ns).map(drop)
}

/// [`flag`], returning the memory its compiled regexes take (as
/// [`flag_regex_bytes`] counts it), for a store that keeps the namespace's
/// total. Refuses a flag over [`MAX_OBJECT_REGEX_BYTES`], or one that would
/// take the namespace over [`MAX_NAMESPACE_REGEX_BYTES`] (with
/// [`NamespaceView::regex_bytes`]), at the first value that does, without
/// compiling the rest.
pub fn flag_measured(flag: &model::Flag, ns: &dyn NamespaceView) -> Result<usize, FieldError> {
    let mut budget = RegexBudget::new("flag", &flag.namespace, ns.regex_bytes());
    namespace_key(&flag.namespace).map_err(|e| e.at("namespace"))?;
    object_key(&flag.key).map_err(|e| e.at("key"))?;
    max_bytes(&flag.description, MAX_DESCRIPTION_BYTES).map_err(|e| e.at("description"))?;
    variants(flag)?;
    variant_ref(flag, &flag.disabled_variant).map_err(|e| e.at("disabled_variant"))?;
    variant_ref(flag, &flag.default_variant).map_err(|e| e.at("default_variant"))?;
    max_items(flag.rules.len(), MAX_RULES, "rules").map_err(|e| e.at("rules"))?;
    for (i, r) in flag.rules.iter().enumerate() {
        rule(flag, r, ns, &mut budget).map_err(|e| e.at_index("rules", i))?;
    }
    max_items(flag.prerequisites.len(), MAX_PREREQUISITES, "prerequisites")
        .map_err(|e| e.at("prerequisites"))?;
    for (i, p) in flag.prerequisites.iter().enumerate() {
        prerequisite(flag, p, ns).map_err(|e| e.at_index("prerequisites", i))?;
    }
    prerequisite_cost(flag, ns).map_err(|e| e.at("prerequisites"))?;
    max_items(flag.tags.len(), MAX_TAGS, "tags").map_err(|e| e.at("tags"))?;
    for (i, tag) in flag.tags.iter().enumerate() {
        required(tag)
            .and_then(|()| max_bytes(tag, MAX_TAG_BYTES))
            .map_err(|e| e.at_index("tags", i))?;
    }
    max_items(flag.metadata.len(), MAX_METADATA_ENTRIES, "entries")
        .map_err(|e| e.at("metadata"))?;
    for (key, value) in &flag.metadata {
        if key.is_empty() {
            return Err(FieldError::new("metadata", "keys must not be empty"));
        }
        if key.len() > MAX_METADATA_KEY_BYTES {
            return Err(FieldError::new(
                "metadata",
                format!(
                    "a key of {} bytes, at most {MAX_METADATA_KEY_BYTES} allowed",
                    key.len()
                ),
            ));
        }
        max_bytes(value, MAX_METADATA_VALUE_BYTES).map_err(|e| e.at_key("metadata", key))?;
    }
    Ok(budget.bytes)
}

/// Checks a segment before it is stored. Segments reference nothing, so no
/// namespace view is needed.
pub fn segment(segment: &model::Segment) -> Result<(), FieldError> {
    segment_measured(segment, 0).map(drop)
}

/// [`segment`], returning the memory its compiled regexes take; the rest of
/// its namespace holds `elsewhere` bytes of them. The budgets apply as in
/// [`flag_measured`].
pub fn segment_measured(segment: &model::Segment, elsewhere: usize) -> Result<usize, FieldError> {
    let mut budget = RegexBudget::new("segment", &segment.namespace, elsewhere);
    namespace_key(&segment.namespace).map_err(|e| e.at("namespace"))?;
    object_key(&segment.key).map_err(|e| e.at("key"))?;
    max_bytes(&segment.description, MAX_DESCRIPTION_BYTES).map_err(|e| e.at("description"))?;
    constraints(&segment.constraints, &mut budget)?;
    Ok(budget.bytes)
}

/// The memory a stored flag's compiled regexes take: each distinct pattern
/// (with its case-insensitivity) once, as [`parse::Regex::memory_usage`]
/// measures it, compiled as the engine compiles stored patterns
/// ([`parse::stored_regex`]); patterns that do not compile count nothing.
/// What the budgets count.
pub fn flag_regex_bytes(flag: &model::Flag) -> usize {
    regex_bytes(flag.rules.iter().flat_map(|r| &r.constraints))
}

/// [`flag_regex_bytes`] for a segment.
pub fn segment_regex_bytes(segment: &model::Segment) -> usize {
    regex_bytes(&segment.constraints)
}

fn regex_bytes<'a>(constraints: impl IntoIterator<Item = &'a model::Constraint>) -> usize {
    let mut seen = HashSet::new();
    constraints
        .into_iter()
        .filter(|c| c.operator == model::Operator::Regex)
        .flat_map(|c| c.values.iter().map(|v| (v.as_str(), c.case_insensitive)))
        .filter(|pattern| seen.insert(*pattern))
        .filter_map(|(v, ci)| parse::stored_regex(v, ci).ok())
        .map(|r| r.memory_usage())
        .sum()
}

/// Checks a whole namespace written at once (an import): every segment and
/// flag, with references resolved among the objects given. Paths start with
/// `segments[i]` or `flags[i]`; keys must be unique.
pub fn bundle(flags: &[model::Flag], segments: &[model::Segment]) -> Result<(), FieldError> {
    bundle_named(flags, segments, Element::Index)
}

/// How [`bundle_named`] names the flag or segment an error is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Element {
    /// By position, `flags[3]`: for bundles written as lists.
    Index,
    /// By key, `flags["checkout"]`: for sources whose order means nothing to
    /// the person reading the error (an Unleash export).
    Key,
}

/// [`bundle`], naming the element an error is in as `names` says.
pub fn bundle_named(
    flags: &[model::Flag],
    segments: &[model::Segment],
    names: Element,
) -> Result<(), FieldError> {
    let place = |error: FieldError, field: &str, index: usize, key: &str| match names {
        Element::Index => error.at_index(field, index),
        Element::Key => error.at_key(field, key),
    };
    let mut view = MemoryView::default();
    for (i, s) in segments.iter().enumerate() {
        view.regex_bytes +=
            segment_measured(s, view.regex_bytes).map_err(|e| place(e, "segments", i, &s.key))?;
        if !view.segments.insert(s.key.clone()) {
            let e = FieldError::new("key", format!("duplicate segment key {}", shown(&s.key)));
            return Err(place(e, "segments", i, &s.key));
        }
    }
    for (i, f) in flags.iter().enumerate() {
        if view.flags.insert(f.key.clone(), f.clone()).is_some() {
            let e = FieldError::new("key", format!("duplicate flag key {}", shown(&f.key)));
            return Err(place(e, "flags", i, &f.key));
        }
    }
    for (i, f) in flags.iter().enumerate() {
        view.regex_bytes += flag_measured(f, &view).map_err(|e| place(e, "flags", i, &f.key))?;
    }
    Ok(())
}

/// Checks an evaluation context against the replica's limits: every field and
/// property value at most 4,096 bytes, at most 64 properties with keys of at
/// most 256 bytes.
pub fn context(ctx: &pb::Context) -> Result<(), FieldError> {
    let fields = [
        ("targeting_key", &ctx.targeting_key),
        ("user_id", &ctx.user_id),
        ("session_id", &ctx.session_id),
        ("remote_address", &ctx.remote_address),
        ("environment", &ctx.environment),
        ("app_name", &ctx.app_name),
    ];
    for (name, value) in fields {
        max_bytes(value, MAX_CONTEXT_VALUE_BYTES).map_err(|e| e.at(name))?;
    }
    max_items(ctx.properties.len(), MAX_CONTEXT_PROPERTIES, "properties")
        .map_err(|e| e.at("properties"))?;
    for (key, value) in &ctx.properties {
        if key.len() > MAX_CONTEXT_KEY_BYTES {
            return Err(FieldError::new(
                "properties",
                format!(
                    "a key of {} bytes, at most {MAX_CONTEXT_KEY_BYTES} allowed",
                    key.len()
                ),
            ));
        }
        max_bytes(value, MAX_CONTEXT_VALUE_BYTES).map_err(|e| e.at_key("properties", key))?;
    }
    Ok(())
}

/// Checks the number of keys of an `EvaluateBatch` call.
pub fn batch_keys(keys: &[String]) -> Result<(), FieldError> {
    max_items(keys.len(), MAX_BATCH_KEYS, "keys").map_err(|e| e.at("flag_keys"))
}

/// Checks a write comment (`WriteOptions.comment`).
pub fn comment(comment: &str) -> Result<(), FieldError> {
    max_bytes(comment, MAX_COMMENT_BYTES).map_err(|e| e.at("comment"))
}

/// The wire name of an operator, without its `OPERATOR_` prefix.
pub fn operator_name(op: &model::Operator) -> &str {
    match op {
        model::Operator::Unknown(name) => name,
        known => {
            let wire = pb::Operator::from(known.clone()).as_str_name();
            wire.strip_prefix("OPERATOR_").unwrap_or(wire)
        }
    }
}

// ---------------------------------------------------------------------------
// Parts of a flag.

fn variants(flag: &model::Flag) -> Result<(), FieldError> {
    if flag.variants.is_empty() {
        return Err(FieldError::new(
            "variants",
            "at least one variant is required",
        ));
    }
    max_items(flag.variants.len(), MAX_VARIANTS, "variants").map_err(|e| e.at("variants"))?;
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(flag.variants.len());
    for (i, v) in flag.variants.iter().enumerate() {
        variant(flag.flag_type, v).map_err(|e| e.at_index("variants", i))?;
        if let Some(first) = seen.insert(&v.name, i) {
            return Err(FieldError::new(
                "name",
                format!(
                    "duplicate variant name {:?} (also variants[{first}])",
                    v.name
                ),
            )
            .at_index("variants", i));
        }
    }
    Ok(())
}

fn variant(flag_type: model::FlagType, v: &model::Variant) -> Result<(), FieldError> {
    required(&v.name)
        .and_then(|()| max_bytes(&v.name, MAX_VARIANT_NAME_BYTES))
        .map_err(|e| e.at("name"))?;
    if v.name.chars().any(char::is_control) {
        return Err(FieldError::new(
            "name",
            format!("{} contains a control character", shown(&v.name)),
        ));
    }
    value(flag_type, &v.value).map_err(|e| e.at("value"))?;
    max_bytes(&v.description, MAX_SHORT_DESCRIPTION_BYTES).map_err(|e| e.at("description"))
}

fn value(flag_type: model::FlagType, value: &model::Value) -> Result<(), FieldError> {
    if value.flag_type() != flag_type {
        return Err(FieldError::new(
            "",
            convert::type_mismatch_reason(flag_type, value),
        ));
    }
    match value {
        model::Value::Bool(_) => Ok(()),
        model::Value::String(s) => {
            max_bytes(s, MAX_STRING_VALUE_BYTES).map_err(|e| e.at("string_value"))
        }
        model::Value::Number(n) if n.is_finite() => Ok(()),
        model::Value::Number(n) => Err(FieldError::new(
            "number_value",
            convert::non_finite_reason(*n),
        )),
        model::Value::Json(json) if json_deeper_than(json, MAX_JSON_DEPTH) => {
            Err(FieldError::new("json_value", convert::json_depth_reason()))
        }
        model::Value::Json(_) => Ok(()),
    }
}

/// Whether `value` nests objects and arrays more than `max` levels deep. Stops
/// descending once the answer is known, so hostile documents cost little.
fn json_deeper_than(value: &serde_json::Value, max: usize) -> bool {
    match value {
        serde_json::Value::Array(items) => {
            max == 0 || items.iter().any(|c| json_deeper_than(c, max - 1))
        }
        serde_json::Value::Object(map) => {
            max == 0 || map.values().any(|c| json_deeper_than(c, max - 1))
        }
        _ => false,
    }
}

/// Checks that `name` names one of the flag's variants.
fn variant_ref(flag: &model::Flag, name: &str) -> Result<(), FieldError> {
    required(name)?;
    if flag.variants.iter().any(|v| v.name == name) {
        Ok(())
    } else {
        Err(FieldError::new(
            "",
            format!("{} is not a variant of this flag", shown(name)),
        ))
    }
}

fn rule<'a>(
    flag: &model::Flag,
    rule: &'a model::Rule,
    ns: &dyn NamespaceView,
    budget: &mut RegexBudget<'a>,
) -> Result<(), FieldError> {
    max_bytes(&rule.name, MAX_RULE_NAME_BYTES).map_err(|e| e.at("name"))?;
    constraints(&rule.constraints, budget)?;
    max_items(rule.segments.len(), MAX_RULE_SEGMENTS, "segments").map_err(|e| e.at("segments"))?;
    for (i, key) in rule.segments.iter().enumerate() {
        required(key).map_err(|e| e.at_index("segments", i))?;
        if !ns.segment_exists(key) {
            return Err(FieldError::new(
                "",
                format!(
                    "no segment {} in namespace {}",
                    shown(key),
                    shown(&flag.namespace)
                ),
            )
            .at_index("segments", i));
        }
    }
    if let Some(rollout) = &rule.rollout {
        stickiness(&rollout.stickiness).map_err(|e| e.at("rollout"))?;
        if rollout.percentage > MAX_PERCENTAGE {
            return Err(FieldError::new(
                "rollout.percentage",
                format!("{} is more than {MAX_PERCENTAGE}", rollout.percentage),
            ));
        }
    }
    match &rule.serve {
        model::Serve::Variant(name) => variant_ref(flag, name).map_err(|e| e.at("serve.variant")),
        model::Serve::Split(s) => split(flag, s).map_err(|e| e.at("serve.split")),
    }
}

fn stickiness(stickiness: &model::Stickiness) -> Result<(), FieldError> {
    match stickiness {
        model::Stickiness::Attribute(attribute) => {
            attribute_name(attribute).map_err(|e| e.at("stickiness"))
        }
        model::Stickiness::Default | model::Stickiness::Random => Ok(()),
    }
}

fn split(flag: &model::Flag, split: &model::Split) -> Result<(), FieldError> {
    if split.variants.is_empty() {
        return Err(FieldError::new(
            "variants",
            "at least one variant is required",
        ));
    }
    max_items(split.variants.len(), MAX_VARIANTS, "variants").map_err(|e| e.at("variants"))?;
    let mut total: u64 = 0;
    for (i, wv) in split.variants.iter().enumerate() {
        variant_ref(flag, &wv.variant).map_err(|e| e.at("variant").at_index("variants", i))?;
        total += u64::from(wv.weight);
    }
    if total == 0 {
        return Err(FieldError::new(
            "variants",
            "the weights add up to 0; at least one must be above 0",
        ));
    }
    if total > MAX_TOTAL_WEIGHT {
        return Err(FieldError::new(
            "variants",
            format!("the weights add up to {total}, more than {MAX_TOTAL_WEIGHT}"),
        ));
    }
    stickiness(&split.stickiness)?;
    max_items(split.overrides.len(), MAX_VARIANTS, "overrides").map_err(|e| e.at("overrides"))?;
    for (i, o) in split.overrides.iter().enumerate() {
        override_(flag, o).map_err(|e| e.at_index("overrides", i))?;
    }
    Ok(())
}

fn override_(flag: &model::Flag, o: &model::Override) -> Result<(), FieldError> {
    attribute_name(&o.attribute).map_err(|e| e.at("attribute"))?;
    value_list(&o.values)?;
    variant_ref(flag, &o.variant).map_err(|e| e.at("variant"))
}

fn prerequisite(
    flag: &model::Flag,
    p: &model::Prerequisite,
    ns: &dyn NamespaceView,
) -> Result<(), FieldError> {
    required(&p.flag).map_err(|e| e.at("flag"))?;
    if p.flag == flag.key {
        return Err(FieldError::new(
            "flag",
            "a flag cannot be its own prerequisite",
        ));
    }
    let Some(parent) = ns.flag(&p.flag) else {
        return Err(FieldError::new(
            "flag",
            format!(
                "no flag {} in namespace {}",
                shown(&p.flag),
                shown(&flag.namespace)
            ),
        ));
    };
    if p.expect_off && !p.variants.is_empty() {
        return Err(FieldError::new(
            "variants",
            "must be empty when expect_off is set",
        ));
    }
    for (i, name) in p.variants.iter().enumerate() {
        if !parent.variants.iter().any(|v| &v.name == name) {
            return Err(FieldError::new(
                "",
                format!(
                    "{} is not a variant of flag {}",
                    shown(name),
                    shown(&p.flag)
                ),
            )
            .at_index("variants", i));
        }
    }
    if let Some(cycle) = cycle_through(flag, &parent, ns) {
        return Err(FieldError::new(
            "flag",
            format!("{:?} forms a cycle: {}", p.flag, cycle.join(" -> ")),
        ));
    }
    Ok(())
}

/// Looks for a path of prerequisites from `parent` back to `flag` (the flag
/// being written, which replaces its stored version), and returns the cycle
/// as keys from `flag` to `flag`. The stored namespace has no cycles, so any
/// new one passes through `flag`; each flag is visited once.
fn cycle_through(
    flag: &model::Flag,
    parent: &model::Flag,
    ns: &dyn NamespaceView,
) -> Option<Vec<String>> {
    // Depth-first search; each stack entry is a flag key and the chain of keys
    // that led to it, so the cycle can be reported in full.
    let mut visited: HashSet<String> = HashSet::from([parent.key.clone()]);
    let mut stack: Vec<(Vec<String>, Vec<String>)> = vec![(
        vec![flag.key.clone(), parent.key.clone()],
        parent
            .prerequisites
            .iter()
            .map(|p| p.flag.clone())
            .collect(),
    )];
    while let Some((chain, mut next)) = stack.pop() {
        let Some(key) = next.pop() else { continue };
        stack.push((chain.clone(), next));
        if key == flag.key {
            let mut cycle = chain;
            cycle.push(key);
            return Some(cycle);
        }
        if !visited.insert(key.clone()) {
            continue;
        }
        if let Some(f) = ns.flag(&key) {
            let mut longer = chain;
            longer.push(key);
            stack.push((
                longer,
                f.prerequisites.iter().map(|p| p.flag.clone()).collect(),
            ));
        }
    }
    None
}

/// What evaluating a flag's prerequisites costs the engine in the worst case
/// (every prerequisite holds, so none short-circuits).
#[derive(Clone, Copy)]
struct Cost {
    /// The longest chain of prerequisites below the flag, in edges.
    chain: u32,
    /// Prerequisite evaluations, counted with repeats as the engine counts them.
    evaluations: u32,
}

/// Refuses prerequisites the engine could never evaluate: chains deeper than
/// [`MAX_PREREQUISITE_CHAIN`] or more than [`MAX_PREREQUISITE_EVALUATIONS`]
/// evaluations. Only what lies below `flag` is seen (the view does not list
/// dependents), which is complete for `bundle` where every flag is checked; a
/// store that updates one flag checks the flags depending on it with this too.
pub fn prerequisite_cost(flag: &model::Flag, ns: &dyn NamespaceView) -> Result<(), FieldError> {
    let mut memo = HashMap::new();
    let cost = cost_of(&flag.prerequisites, ns, &mut memo, 0);
    if cost.chain > MAX_PREREQUISITE_CHAIN {
        return Err(FieldError::new(
            "",
            format!(
                "a chain of more than {MAX_PREREQUISITE_CHAIN} prerequisites cannot be evaluated"
            ),
        ));
    }
    if cost.evaluations > MAX_PREREQUISITE_EVALUATIONS {
        return Err(FieldError::new(
            "",
            format!(
                "evaluating this flag would take more than {MAX_PREREQUISITE_EVALUATIONS} prerequisite evaluations"
            ),
        ));
    }
    Ok(())
}

/// The cost of a list of prerequisites, memoized per flag key so shared
/// parents are visited once. Descent stops just past the chain limit, which
/// also ends any cycle already stored; the answer is then "too deep" anyway.
fn cost_of(
    prerequisites: &[model::Prerequisite],
    ns: &dyn NamespaceView,
    memo: &mut HashMap<String, Cost>,
    level: u32,
) -> Cost {
    let mut total = Cost {
        chain: 0,
        evaluations: 0,
    };
    if level > MAX_PREREQUISITE_CHAIN {
        total.chain = u32::from(!prerequisites.is_empty());
        return total;
    }
    for p in prerequisites {
        let parent = match memo.get(&p.flag) {
            Some(cost) => *cost,
            None => {
                let cost = match ns.flag(&p.flag) {
                    Some(f) => cost_of(&f.prerequisites, ns, memo, level + 1),
                    None => Cost {
                        chain: 0,
                        evaluations: 0,
                    },
                };
                memo.insert(p.flag.clone(), cost);
                cost
            }
        };
        total.chain = total.chain.max(parent.chain.saturating_add(1));
        total.evaluations = total
            .evaluations
            .saturating_add(parent.evaluations)
            .saturating_add(1);
    }
    total
}

// ---------------------------------------------------------------------------
// Constraints.

fn constraints<'a>(
    constraints: &'a [model::Constraint],
    budget: &mut RegexBudget<'a>,
) -> Result<(), FieldError> {
    max_items(constraints.len(), MAX_CONSTRAINTS, "constraints")
        .map_err(|e| e.at("constraints"))?;
    for (i, c) in constraints.iter().enumerate() {
        constraint(c, budget).map_err(|e| e.at_index("constraints", i))?;
    }
    Ok(())
}

/// The compiled regexes of the flag or segment being checked, against
/// [`MAX_OBJECT_REGEX_BYTES`] and [`MAX_NAMESPACE_REGEX_BYTES`].
struct RegexBudget<'a> {
    /// `flag` or `segment`, for messages.
    what: &'static str,
    /// The namespace, for messages.
    namespace: &'a str,
    /// What the rest of the namespace holds.
    elsewhere: usize,
    /// The distinct patterns seen so far (an identical one is compiled once,
    /// here and in the engine).
    seen: HashSet<(&'a str, bool)>,
    /// What the distinct patterns seen so far take.
    bytes: usize,
}

impl<'a> RegexBudget<'a> {
    fn new(what: &'static str, namespace: &'a str, elsewhere: usize) -> RegexBudget<'a> {
        RegexBudget {
            what,
            namespace,
            elsewhere,
            seen: HashSet::new(),
            bytes: 0,
        }
    }

    /// Compiles `pattern` unless seen already and charges it; the error is the
    /// reason, for the value's path.
    fn charge(&mut self, pattern: &'a str, case_insensitive: bool) -> Result<(), String> {
        if !self.seen.insert((pattern, case_insensitive)) {
            return Ok(());
        }
        let regex = parse::regex(pattern, case_insensitive).map_err(|e| match e {
            parse::RegexError::Invalid(reason) => {
                format!("{pattern:?} is not a valid regular expression: {reason}")
            }
            parse::RegexError::TooLarge(reason) => reason,
        })?;
        self.bytes += regex.memory_usage();
        let what = self.what;
        if self.bytes > MAX_OBJECT_REGEX_BYTES {
            return Err(format!(
                "with this regex the {what} uses {} of compiled regexes, over the {} budget per {what}",
                parse::kib(self.bytes),
                parse::kib(MAX_OBJECT_REGEX_BYTES)
            ));
        }
        let total = self.elsewhere.saturating_add(self.bytes);
        if total > MAX_NAMESPACE_REGEX_BYTES {
            return Err(format!(
                "with this regex namespace {:?} uses {} of compiled regexes, over the {} budget per namespace",
                self.namespace,
                parse::kib(total),
                parse::kib(MAX_NAMESPACE_REGEX_BYTES)
            ));
        }
        Ok(())
    }
}

/// The kind of operand an operator takes, which decides how its values parse
/// and how many it takes.
enum Operand {
    /// Any strings, one or more.
    Strings,
    /// Regular expressions, one or more.
    Regexes,
    /// CIDR ranges or addresses, one or more.
    Cidrs,
    /// Exactly one decimal number.
    Number,
    /// Exactly one RFC 3339 date.
    Date,
    /// Exactly one semantic version.
    Semver,
}

fn operand(op: &model::Operator) -> Result<Operand, FieldError> {
    use model::Operator as O;
    Ok(match op {
        O::In | O::NotIn | O::StrContains | O::StrStartsWith | O::StrEndsWith => Operand::Strings,
        O::Regex => Operand::Regexes,
        O::InCidr => Operand::Cidrs,
        O::NumEq | O::NumGt | O::NumGte | O::NumLt | O::NumLte => Operand::Number,
        O::DateAfter | O::DateBefore => Operand::Date,
        O::SemverEq | O::SemverGt | O::SemverGte | O::SemverLt | O::SemverLte => Operand::Semver,
        O::Unknown(name) => {
            return Err(FieldError::new(
                "operator",
                format!("unknown operator {}", shown(name)),
            ));
        }
    })
}

fn constraint<'a>(
    c: &'a model::Constraint,
    budget: &mut RegexBudget<'a>,
) -> Result<(), FieldError> {
    attribute_name(&c.attribute).map_err(|e| e.at("attribute"))?;
    let kind = operand(&c.operator)?;
    value_list(&c.values)?;
    let single = matches!(kind, Operand::Number | Operand::Date | Operand::Semver);
    if single && c.values.len() != 1 {
        return Err(FieldError::new(
            "values",
            format!(
                "{} takes exactly one value, got {}",
                operator_name(&c.operator),
                c.values.len()
            ),
        ));
    }
    for (i, v) in c.values.iter().enumerate() {
        let problem = match kind {
            Operand::Strings => None,
            Operand::Regexes => budget.charge(v, c.case_insensitive).err(),
            Operand::Cidrs => parse::cidr(v)
                .is_none()
                .then(|| format!("{} is not an IP address or CIDR range", shown(v))),
            Operand::Number => parse::number(v)
                .is_none()
                .then(|| format!("{} is not a number", shown(v))),
            Operand::Date => parse::date_ms(v)
                .is_none()
                .then(|| format!("{} is not an RFC 3339 date", shown(v))),
            Operand::Semver => parse::semver(v)
                .is_none()
                .then(|| format!("{} is not a semantic version", shown(v))),
        };
        if let Some(reason) = problem {
            return Err(FieldError::new("", reason).at_index("values", i));
        }
    }
    Ok(())
}

/// Checks a list of constraint or override values: 1 to 1,000 values of at
/// most 4,096 bytes each.
fn value_list(values: &[String]) -> Result<(), FieldError> {
    if values.is_empty() {
        return Err(FieldError::new("values", "at least one value is required"));
    }
    max_items(values.len(), MAX_VALUES, "values").map_err(|e| e.at("values"))?;
    for (i, v) in values.iter().enumerate() {
        max_bytes(v, MAX_VALUE_BYTES).map_err(|e| e.at_index("values", i))?;
    }
    Ok(())
}

fn attribute_name(attribute: &model::Attribute) -> Result<(), FieldError> {
    match attribute {
        model::Attribute::Property(name) => {
            required(name)?;
            max_bytes(name, MAX_CONTEXT_KEY_BYTES)
        }
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------
// Small checks shared by the above.

fn required(s: &str) -> Result<(), FieldError> {
    if s.is_empty() {
        Err(FieldError::new("", "required"))
    } else {
        Ok(())
    }
}

fn max_bytes(s: &str, max: usize) -> Result<(), FieldError> {
    if s.len() > max {
        Err(FieldError::new(
            "",
            format!("{} bytes, at most {max} allowed", s.len()),
        ))
    } else {
        Ok(())
    }
}

fn max_items(count: usize, max: usize, noun: &str) -> Result<(), FieldError> {
    if count > max {
        Err(FieldError::new(
            "",
            format!("{count} {noun}, at most {max} allowed"),
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_quotes_short_values_whole_and_long_ones_by_a_prefix() {
        assert_eq!(shown("beta-\"x\"").to_string(), r#""beta-\"x\"""#);
        let long = "k".repeat(10_000);
        assert_eq!(
            shown(&long).to_string(),
            format!("\"{}…\" (10000 bytes)", "k".repeat(MAX_SHOWN_BYTES))
        );
        // Cut at a character boundary: 'é' is two bytes.
        let accented = "é".repeat(100);
        let text = shown(&accented).to_string();
        assert!(
            text.starts_with(&format!("\"{}…\"", "é".repeat(32))),
            "{text}"
        );
    }
}
