//! Compiling a `model::Flag` into its evaluation form: attribute names
//! resolved, operands parsed, regexes built and lists turned into sets once,
//! so that evaluating is lookups and comparisons only.

use std::any::Any;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use ipnet::IpNet;

use super::FastHash;
use super::parse;
use crate::model::{self, Attribute, Operator, Serve, Stickiness};

/// A flag ready to evaluate, together with the model it was compiled from.
pub struct CompiledFlag {
    /// The model this was compiled from, kept for listing and recompiling.
    pub(super) source: model::Flag,
    /// Index of the variant served while disabled; `None` when the model names
    /// a variant it does not have (an evaluation error).
    pub(super) disabled: Option<usize>,
    /// Index of the variant served when no rule matches.
    pub(super) default: Option<usize>,
    /// The rules, in order.
    pub(super) rules: Box<[CompiledRule]>,
    /// The prerequisites, in order.
    pub(super) prerequisites: Box<[CompiledPrerequisite]>,
    /// What a user of the engine derived from this compiled flag (see
    /// [`CompiledFlag::attachment`]); built on first use, dropped with it.
    attachment: OnceLock<Box<dyn Any + Send + Sync>>,
}

impl fmt::Debug for CompiledFlag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompiledFlag")
            .field("source", &self.source)
            .field("disabled", &self.disabled)
            .field("default", &self.default)
            .field("rules", &self.rules)
            .field("prerequisites", &self.prerequisites)
            .finish_non_exhaustive()
    }
}

impl CompiledFlag {
    /// The flag key.
    pub fn key(&self) -> &str {
        &self.source.key
    }

    /// The type of every variant value.
    pub fn flag_type(&self) -> model::FlagType {
        self.source.flag_type
    }

    /// The revision of the write that last changed the flag.
    pub fn revision(&self) -> u64 {
        self.source.stamp.updated_revision
    }

    /// The flag's free metadata.
    pub fn metadata(&self) -> &model::Metadata {
        &self.source.metadata
    }

    /// The model the flag was compiled from.
    pub fn source(&self) -> &model::Flag {
        &self.source
    }

    /// Data a user of the engine derives from this flag, built by `init` on
    /// the first call and kept with this compiled form: an edit compiles a new
    /// form, so the data can never describe an older version of the flag.
    /// flagread keeps a flag's pre-encoded results and its counters here.
    ///
    /// One type per flag: `None` when data of another type was attached first.
    pub fn attachment<T: Any + Send + Sync>(
        &self,
        init: impl FnOnce(&CompiledFlag) -> T,
    ) -> Option<&T> {
        self.attachment
            .get_or_init(|| Box::new(init(self)))
            .downcast_ref()
    }

    /// Whether a rule of the flag references segment `key`.
    pub fn uses_segment(&self, key: &str) -> bool {
        self.source
            .rules
            .iter()
            .any(|r| r.segments.iter().any(|s| s == key))
    }
}

/// A segment's constraints, compiled once and shared by every rule using it.
#[derive(Debug)]
pub(super) struct CompiledSegment {
    pub(super) source: model::Segment,
    pub(super) constraints: Arc<[CompiledConstraint]>,
}

impl CompiledSegment {
    pub(super) fn new(source: model::Segment) -> CompiledSegment {
        let constraints = source.constraints.iter().map(compile_constraint).collect();
        CompiledSegment {
            source,
            constraints,
        }
    }
}

#[derive(Debug)]
pub(super) struct CompiledRule {
    /// A rule that references a missing segment never matches (as Unleash
    /// turns a strategy with a missing segment off).
    pub(super) never: bool,
    pub(super) constraints: Box<[CompiledConstraint]>,
    pub(super) segments: Box<[Arc<[CompiledConstraint]>]>,
    pub(super) rollout: Option<CompiledRollout>,
    pub(super) serve: CompiledServe,
}

#[derive(Debug)]
pub(super) struct CompiledRollout {
    pub(super) percentage: u32,
    pub(super) stickiness: Sticky,
    pub(super) group: Box<str>,
}

#[derive(Debug)]
pub(super) enum CompiledServe {
    /// A variant index, or `None` for a name the flag lacks.
    Variant(Option<usize>),
    Split(CompiledSplit),
}

#[derive(Debug)]
pub(super) struct CompiledSplit {
    /// Variant indexes (None for unknown names) with their cumulative weights.
    pub(super) variants: Box<[(Option<usize>, u64)]>,
    pub(super) total: u64,
    pub(super) stickiness: Sticky,
    pub(super) group: Box<str>,
    pub(super) overrides: Box<[(Attr, StrSet, Option<usize>)]>,
}

/// Which context value is hashed.
#[derive(Debug)]
pub(super) enum Sticky {
    /// userId (or the targeting key), then sessionId, then random.
    Default,
    Random,
    Attribute(Attr),
}

#[derive(Debug)]
pub(super) struct CompiledPrerequisite {
    pub(super) flag: Box<str>,
    pub(super) expect_off: bool,
    pub(super) variants: Box<[Box<str>]>,
}

/// A context attribute, resolved from its name.
#[derive(Debug, Clone)]
pub(super) enum Attr {
    TargetingKey,
    UserId,
    SessionId,
    RemoteAddress,
    Environment,
    AppName,
    CurrentTime,
    Property(Box<str>),
}

#[derive(Debug, Clone)]
pub(super) struct CompiledConstraint {
    pub(super) attr: Attr,
    pub(super) inverted: bool,
    pub(super) op: Op,
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Cmp {
    Eq,
    Gt,
    Gte,
    Lt,
    Lte,
}

impl Cmp {
    pub(super) fn holds(self, ordering: std::cmp::Ordering) -> bool {
        use std::cmp::Ordering::*;
        match self {
            Cmp::Eq => ordering == Equal,
            Cmp::Gt => ordering == Greater,
            Cmp::Gte => ordering != Less,
            Cmp::Lt => ordering == Less,
            Cmp::Lte => ordering != Greater,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StrOp {
    Contains,
    StartsWith,
    EndsWith,
}

/// A compiled operator with its parsed operands.
#[derive(Debug, Clone)]
pub(super) enum Op {
    /// Never holds, whatever `inverted` says: an unknown operator or an
    /// operand that does not parse (Unleash's engine turns these off).
    Never,
    In(StrSet),
    NotIn(StrSet),
    Str {
        op: StrOp,
        /// Pre-lowered when case-insensitive.
        values: Arc<[Box<str>]>,
        case_insensitive: bool,
    },
    Num(Cmp, f64),
    Date(Cmp, i64),
    Semver(Cmp, Arc<semver::Version>),
    /// Each regex is shared with every other flag using the same pattern.
    Regex(Arc<[Arc<parse::Regex>]>),
    Cidr(Arc<[IpNet]>),
}

/// A set of strings for IN, NOT_IN and overrides: a short list is scanned
/// (faster than hashing for a handful), a long one is a hash set.
#[derive(Debug, Clone)]
pub(super) struct StrSet {
    small: Arc<[Box<str>]>,
    large: Option<Arc<HashSet<Box<str>, FastHash>>>,
    /// Values were lowered; lookups lower the context value too.
    pub(super) case_insensitive: bool,
}

/// Lists up to this long are scanned rather than hashed.
const SMALL_SET: usize = 8;

impl StrSet {
    fn new(values: &[String], case_insensitive: bool) -> StrSet {
        let lowered: Vec<Box<str>> = values
            .iter()
            .map(|v| {
                if case_insensitive {
                    v.to_lowercase().into_boxed_str()
                } else {
                    v.clone().into_boxed_str()
                }
            })
            .collect();
        if lowered.len() <= SMALL_SET {
            StrSet {
                small: lowered.into(),
                large: None,
                case_insensitive,
            }
        } else {
            StrSet {
                small: Arc::from(Vec::new()),
                large: Some(Arc::new(lowered.into_iter().collect())),
                case_insensitive,
            }
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.small.is_empty() && self.large.as_ref().is_none_or(|s| s.is_empty())
    }

    /// Whether `value` (already lowered when the set is case-insensitive) is in the set.
    pub(super) fn contains(&self, value: &str) -> bool {
        match &self.large {
            Some(set) => set.contains(value),
            None => self.small.iter().any(|v| &**v == value),
        }
    }
}

pub(super) fn attr(attribute: &Attribute) -> Attr {
    match attribute {
        Attribute::TargetingKey => Attr::TargetingKey,
        Attribute::UserId => Attr::UserId,
        Attribute::SessionId => Attr::SessionId,
        Attribute::RemoteAddress => Attr::RemoteAddress,
        Attribute::Environment => Attr::Environment,
        Attribute::AppName => Attr::AppName,
        Attribute::CurrentTime => Attr::CurrentTime,
        Attribute::Property(name) => Attr::Property(name.clone().into_boxed_str()),
    }
}

fn sticky(stickiness: &Stickiness) -> Sticky {
    match stickiness {
        Stickiness::Default => Sticky::Default,
        Stickiness::Random => Sticky::Random,
        Stickiness::Attribute(a) => Sticky::Attribute(attr(a)),
    }
}

/// Compiles one flag against the namespace's segments. Never fails: what
/// cannot be compiled evaluates as Unleash does (a constraint that never
/// holds, a rule that never matches, an error result for a missing variant).
pub(super) fn compile_flag(
    flag: model::Flag,
    segments: &BTreeMap<String, Arc<CompiledSegment>>,
) -> CompiledFlag {
    // Flags have few variants; a scan is cheaper than building an index.
    let variant = |name: &str| flag.variants.iter().position(|v| v.name == name);
    let group = |g: &Option<String>| -> Box<str> {
        g.as_deref()
            .filter(|g| !g.is_empty())
            .unwrap_or(&flag.key)
            .into()
    };
    let rules = flag
        .rules
        .iter()
        .map(|rule| {
            let mut never = false;
            let segs = rule
                .segments
                .iter()
                .filter_map(|key| match segments.get(key) {
                    Some(s) => Some(s.constraints.clone()),
                    None => {
                        never = true;
                        None
                    }
                })
                .collect();
            let rollout = rule.rollout.as_ref().map(|r| CompiledRollout {
                percentage: r.percentage.min(100),
                stickiness: sticky(&r.stickiness),
                group: group(&r.group_id),
            });
            let serve = match &rule.serve {
                Serve::Variant(name) => CompiledServe::Variant(variant(name)),
                Serve::Split(split) => {
                    let mut total = 0u64;
                    let variants = split
                        .variants
                        .iter()
                        .map(|wv| {
                            total += u64::from(wv.weight);
                            (variant(&wv.variant), total)
                        })
                        .collect();
                    let overrides = split
                        .overrides
                        .iter()
                        .map(|o| {
                            (
                                attr(&o.attribute),
                                StrSet::new(&o.values, false),
                                variant(&o.variant),
                            )
                        })
                        .collect();
                    CompiledServe::Split(CompiledSplit {
                        variants,
                        total,
                        stickiness: sticky(&split.stickiness),
                        group: group(&split.group_id),
                        overrides,
                    })
                }
            };
            CompiledRule {
                never,
                constraints: rule.constraints.iter().map(compile_constraint).collect(),
                segments: segs,
                rollout,
                serve,
            }
        })
        .collect();
    let prerequisites = flag
        .prerequisites
        .iter()
        .map(|p| CompiledPrerequisite {
            flag: p.flag.as_str().into(),
            expect_off: p.expect_off,
            variants: p.variants.iter().map(|v| v.as_str().into()).collect(),
        })
        .collect();
    let disabled = variant(&flag.disabled_variant);
    let default = variant(&flag.default_variant);
    CompiledFlag {
        source: flag,
        disabled,
        default,
        rules,
        prerequisites,
        attachment: OnceLock::new(),
    }
}

/// Compiles one constraint; operands that do not parse make it `Op::Never`
/// (single-operand operators) or are skipped (list operators).
pub(super) fn compile_constraint(c: &model::Constraint) -> CompiledConstraint {
    let single = || c.values.first().map(String::as_str);
    let cmp_of = |op: &Operator| match op {
        Operator::NumEq | Operator::SemverEq => Cmp::Eq,
        Operator::NumGt | Operator::SemverGt | Operator::DateAfter => Cmp::Gt,
        Operator::NumGte | Operator::SemverGte => Cmp::Gte,
        Operator::NumLt | Operator::SemverLt | Operator::DateBefore => Cmp::Lt,
        _ => Cmp::Lte,
    };
    let str_op = |op: StrOp| Op::Str {
        op,
        values: c
            .values
            .iter()
            .map(|v| {
                if c.case_insensitive {
                    v.to_lowercase()
                } else {
                    v.clone()
                }
                .into_boxed_str()
            })
            .collect(),
        case_insensitive: c.case_insensitive,
    };
    let op = match &c.operator {
        Operator::In => Op::In(StrSet::new(&c.values, c.case_insensitive)),
        Operator::NotIn => Op::NotIn(StrSet::new(&c.values, c.case_insensitive)),
        Operator::StrContains => str_op(StrOp::Contains),
        Operator::StrStartsWith => str_op(StrOp::StartsWith),
        Operator::StrEndsWith => str_op(StrOp::EndsWith),
        op @ (Operator::NumEq
        | Operator::NumGt
        | Operator::NumGte
        | Operator::NumLt
        | Operator::NumLte) => match single().and_then(parse::number) {
            Some(n) => Op::Num(cmp_of(op), n),
            None => Op::Never,
        },
        op @ (Operator::DateAfter | Operator::DateBefore) => {
            match single().and_then(parse::date_ms) {
                Some(ms) => Op::Date(cmp_of(op), ms),
                None => Op::Never,
            }
        }
        op @ (Operator::SemverEq
        | Operator::SemverGt
        | Operator::SemverGte
        | Operator::SemverLt
        | Operator::SemverLte) => match single().and_then(parse::semver) {
            Some(v) => Op::Semver(cmp_of(op), Arc::new(v)),
            None => Op::Never,
        },
        Operator::Regex => {
            let regexes: Vec<Arc<parse::Regex>> = c
                .values
                .iter()
                .filter_map(|p| cached_regex(p, c.case_insensitive))
                .collect();
            if regexes.is_empty() {
                Op::Never
            } else {
                Op::Regex(regexes.into())
            }
        }
        Operator::InCidr => {
            let nets: Vec<IpNet> = c.values.iter().filter_map(|v| parse::cidr(v)).collect();
            Op::Cidr(nets.into())
        }
        Operator::Unknown(_) => Op::Never,
    };
    CompiledConstraint {
        attr: attr(&c.attribute),
        inverted: c.inverted,
        op,
    }
}

/// Compiles a regex, or shares the compilation of the same pattern that a
/// compiled flag or segment still holds: compiling is by far the costliest
/// part of compiling a flag, and flags of a namespace often share patterns.
///
/// The cache keeps only weak references, so a regex lives exactly as long as
/// some compiled constraint holds it: deleting the last flag that uses a
/// pattern gives its memory back. Dead entries are pruned whenever the map has
/// doubled since the last pruning, which keeps it within about twice the live
/// patterns at a constant cost per insert. Patterns that do not compile are not
/// cached (validation refuses them before they are stored). Stored patterns
/// compile within the limit they were written under
/// ([`parse::stored_regex`]), so lowering the limit for writes changes no
/// stored flag's evaluation.
fn cached_regex(pattern: &str, case_insensitive: bool) -> Option<Arc<parse::Regex>> {
    let cache = regex_cache();
    let key = (Box::<str>::from(pattern), case_insensitive);
    if let Some(live) = cache
        .lock()
        .ok()
        .and_then(|c| c.entries.get(&key).and_then(Weak::upgrade))
    {
        return Some(live);
    }
    // Compiled outside the lock: another thread may compile the same pattern
    // meanwhile, and the entry written last wins; both copies are correct.
    let compiled = Arc::new(parse::stored_regex(pattern, case_insensitive).ok()?);
    if let Ok(mut c) = cache.lock() {
        c.insert(key, &compiled);
    }
    Some(compiled)
}

/// The cache behind [`cached_regex`].
#[derive(Default)]
struct RegexCache {
    /// Pattern and case-insensitivity to the regex, while anything holds it.
    entries: HashMap<(Box<str>, bool), Weak<parse::Regex>, FastHash>,
    /// The number of entries after the last pruning; the next pruning runs
    /// when there are twice as many (and at least 64).
    pruned_at: usize,
}

impl RegexCache {
    fn insert(&mut self, key: (Box<str>, bool), regex: &Arc<parse::Regex>) {
        if self.entries.len() >= (2 * self.pruned_at).max(64) {
            self.entries.retain(|_, weak| weak.strong_count() > 0);
            self.pruned_at = self.entries.len();
        }
        self.entries.insert(key, Arc::downgrade(regex));
    }
}

fn regex_cache() -> &'static Mutex<RegexCache> {
    static CACHE: OnceLock<Mutex<RegexCache>> = OnceLock::new();
    CACHE.get_or_init(Mutex::default)
}

/// The regexes compiled flags and segments hold right now, process-wide: how
/// many distinct patterns and their compiled bytes (each shared regex counted
/// once).
pub fn live_regexes() -> (usize, usize) {
    let Ok(cache) = regex_cache().lock() else {
        return (0, 0);
    };
    cache
        .entries
        .values()
        .filter_map(Weak::upgrade)
        .fold((0, 0), |(n, bytes), r| (n + 1, bytes + r.memory_usage()))
}

/// How many entries, live or dead, the cache has.
#[cfg(test)]
pub(super) fn regex_cache_entries() -> usize {
    regex_cache().lock().map_or(0, |c| c.entries.len())
}

/// Whether a compiled flag or segment holds a regex for this pattern.
pub fn regex_is_live(pattern: &str, case_insensitive: bool) -> bool {
    regex_cache().lock().is_ok_and(|c| {
        c.entries
            .get(&(Box::<str>::from(pattern), case_insensitive))
            .is_some_and(|w| w.strong_count() > 0)
    })
}

/// Whether an IP range contains an address, IPv4-mapped IPv6 addresses
/// included (a proxy may report `::ffff:10.0.0.1`).
pub(super) fn net_contains(net: &IpNet, ip: IpAddr) -> bool {
    if net.contains(&ip) {
        return true;
    }
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .is_some_and(|v4| net.contains(&IpAddr::V4(v4))),
        IpAddr::V4(_) => false,
    }
}
