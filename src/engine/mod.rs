//! The evaluation engine: flags compiled once into an evaluation form, and
//! evaluation with Unleash's semantics. Pure: no I/O, no wire types.
//!
//! # Evaluation
//! The order is the one documented on `Flag` in
//! `proto/flagstream/v1/types.proto`: a disabled flag serves its disabled
//! variant (DISABLED); a failed prerequisite serves the disabled variant
//! (PREREQUISITE_FAILED); a flag without rules serves its default variant
//! (STATIC); otherwise the first matching rule decides (TARGETING_MATCH, or
//! SPLIT when a weighted split chose), and when none matches the default
//! variant is served (DEFAULT).
//!
//! A rule matches when all its constraints hold, all its segments match and
//! its rollout lets the context through. Semantics follow Unleash exactly:
//! - rollout bucket = murmur3 x86_32 (seed 0) of `"<group>:<sticky value>"`
//!   % 100 + 1, open when it is at most the percentage; the group defaults to
//!   the flag key;
//! - split target = murmur3 (seed 86028157) of the same string modulo the
//!   total weight, plus 1, served by walking the cumulative weights;
//!   overrides come first (reason TARGETING_MATCH);
//! - `default` stickiness is userId (the targeting key when userId is empty),
//!   then sessionId, then a random value; a named attribute that is missing
//!   closes a rollout, and makes a split fall back to a random value;
//! - a missing attribute makes a constraint false (NOT_IN: true), then
//!   `inverted` applies; an unknown operator or an operand that does not
//!   parse never holds, whatever `inverted` says; unparsable context values
//!   are false before `inverted`; list operands that do not parse (CIDRs,
//!   regexes) are skipped;
//! - date operators compare with `current_time_ms` (or the clock) when the
//!   attribute is `currentTime`, and parse RFC 3339 from any other attribute;
//!   other operators see `currentTime` as missing;
//! - a rule referencing a missing segment never matches;
//! - a prerequisite holds when its parent is on (reason STATIC,
//!   TARGETING_MATCH or SPLIT) and, if it lists variants, served one of them;
//!   with `expect_off`, when the parent is off. A missing parent fails it.
//!   Chains of [`MAX_PREREQUISITE_DEPTH`] links or more, and evaluations
//!   needing more than [`MAX_PREREQUISITE_EVALUATIONS`] parent evaluations,
//!   fail, which also ends cycles.
//!
//! Evaluating does not allocate in the common path: attribute values are
//! borrowed, hashes stream over the pieces, case-insensitive comparisons
//! lower ASCII values in a stack buffer, and random stickiness draws from a
//! thread-local generator.

mod compile;
mod eval;
pub mod parse;
mod sharded;

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::{Arc, OnceLock};

pub use compile::{CompiledFlag, live_regexes, regex_is_live};
use compile::{CompiledSegment, compile_flag};
pub use sharded::ShardedMap;

use crate::model;

/// Evaluation depth limit: chains of at most `MAX_PREREQUISITE_DEPTH - 1`
/// prerequisite links (flag → parent → grandparent …) are evaluated; a longer
/// chain fails its deepest prerequisite, which also ends cycles.
pub const MAX_PREREQUISITE_DEPTH: u32 = 8;
/// At most this many parent evaluations (counted with repeats) per evaluated
/// flag; the prerequisite needing one more fails.
pub const MAX_PREREQUISITE_EVALUATIONS: u32 = 64;

/// What an evaluation knows about the caller: a borrowed view, built without
/// allocating. An empty `&str` means the field is absent (proto3 semantics).
#[derive(Debug, Clone, Copy, Default)]
pub struct Context<'a> {
    /// OpenFeature's targeting key; used as userId when `user_id` is empty.
    pub targeting_key: &'a str,
    /// The user; the first choice of `default` stickiness.
    pub user_id: &'a str,
    /// The session; the second choice of `default` stickiness.
    pub session_id: &'a str,
    /// The caller's IP address, for IN_CIDR.
    pub remote_address: &'a str,
    /// The caller's environment name.
    pub environment: &'a str,
    /// The calling application's name.
    pub app_name: &'a str,
    /// The time date constraints compare with, in milliseconds since the Unix
    /// epoch; `None` means the time of evaluation.
    pub current_time_ms: Option<i64>,
    /// Free attributes, referenced by name.
    pub properties: Option<&'a HashMap<String, String>>,
}

/// Why an evaluation served what it served (OpenFeature's reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The flag has no rules.
    Static,
    /// A rule matched and served a fixed variant (or a split override).
    TargetingMatch,
    /// A rule matched and a weighted split chose the variant.
    Split,
    /// Rules exist but none matched.
    Default,
    /// The flag is switched off.
    Disabled,
    /// A prerequisite was not as required.
    PrerequisiteFailed,
    /// No value could be served; see `Evaluation::error`.
    Error,
}

/// Why an evaluation failed (OpenFeature's codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// No flag with that key.
    FlagNotFound,
    /// The flag's type is not the one asked for (set by callers that check it).
    TypeMismatch,
    /// Anything else, e.g. a rule naming a variant the flag does not have.
    General,
}

/// The outcome of evaluating one flag, borrowing from the `FlagSet`.
#[derive(Debug, Clone, Copy)]
pub struct Evaluation<'a> {
    /// The flag evaluated; `None` when not found.
    pub flag: Option<&'a CompiledFlag>,
    /// The value served; `None` on error.
    pub value: Option<&'a model::Value>,
    /// The name of the variant served; `None` on error.
    pub variant: Option<&'a str>,
    /// The position of that variant in the flag's `variants`.
    pub variant_index: Option<usize>,
    pub reason: Reason,
    /// Index into the flag's rules of the rule that decided.
    pub rule_index: Option<usize>,
    /// Set when `reason` is `Error`.
    pub error: Option<ErrorCode>,
}

impl Evaluation<'_> {
    /// The result for a key that names no flag.
    pub fn not_found() -> Evaluation<'static> {
        Evaluation {
            flag: None,
            value: None,
            variant: None,
            variant_index: None,
            reason: Reason::Error,
            rule_index: None,
            error: Some(ErrorCode::FlagNotFound),
        }
    }

    /// Whether the flag is "on" for the context in Unleash's sense: served by
    /// a rule or statically.
    pub fn is_on(&self) -> bool {
        matches!(
            self.reason,
            Reason::Static | Reason::TargetingMatch | Reason::Split
        )
    }
}

/// All compiled flags and segments of one namespace.
///
/// Clone is cheap (structural sharing): flags live in `SHARDS` shared hash
/// maps, so upserting or removing one flag copies one shard (when shared) and
/// recompiles that flag only; a segment change recompiles the flags that use
/// it. A replica can therefore copy-on-write and publish with arc-swap.
#[derive(Clone, Default)]
pub struct FlagSet {
    /// The flags by key.
    flags: ShardedMap<Arc<str>, Arc<CompiledFlag>>,
    /// Number of flags.
    len: usize,
    /// Segments by key, compiled; few and rarely changed, so copied whole.
    segments: Arc<BTreeMap<String, Arc<CompiledSegment>>>,
    /// Flag keys in order, computed on first use after a key was added or
    /// removed (an update of an existing flag keeps it).
    order: OnceLock<Arc<[Arc<str>]>>,
    /// The flags in key order, rebuilt from `order` by lookups (no sort) on
    /// first use after any change: iterating it avoids a lookup per flag.
    ordered: OnceLock<Arc<[Arc<CompiledFlag>]>>,
}

/// Number of shards of a [`ShardedMap`]; a write copies at most 1/SHARDS of the entries.
const SHARDS: usize = 64;

impl FlagSet {
    /// An empty set.
    pub fn new() -> FlagSet {
        FlagSet::default()
    }

    /// Compiles and inserts (or replaces) a flag. Infallible: what cannot be
    /// compiled evaluates as Unleash does (bad regexes never match, …).
    pub fn upsert_flag(&mut self, flag: model::Flag) {
        let compiled = Arc::new(compile_flag(flag, &self.segments));
        let key: Arc<str> = Arc::from(compiled.key());
        if self.flags.insert(key, compiled).is_none() {
            self.len += 1;
            self.order = OnceLock::new();
        }
        self.ordered = OnceLock::new();
    }

    /// Removes a flag; false when there was none.
    pub fn remove_flag(&mut self, key: &str) -> bool {
        if self.flags.remove(key).is_none() {
            return false;
        }
        self.len -= 1;
        self.order = OnceLock::new();
        self.ordered = OnceLock::new();
        true
    }

    /// Inserts (or replaces) a segment and recompiles the flags using it.
    pub fn upsert_segment(&mut self, segment: model::Segment) {
        let key = segment.key.clone();
        Arc::make_mut(&mut self.segments)
            .insert(key.clone(), Arc::new(CompiledSegment::new(segment)));
        self.recompile_users(&key);
    }

    /// Removes a segment (rules using it stop matching); false when there was none.
    pub fn remove_segment(&mut self, key: &str) -> bool {
        if !self.segments.contains_key(key) {
            return false;
        }
        Arc::make_mut(&mut self.segments).remove(key);
        self.recompile_users(key);
        true
    }

    /// The compiled flag with this key.
    #[inline]
    pub fn get(&self, key: &str) -> Option<&CompiledFlag> {
        self.flags.get(key).map(|f| &**f)
    }

    /// Evaluates the flag `key` for `ctx`.
    #[inline]
    pub fn evaluate<'s>(&'s self, key: &str, ctx: &Context<'_>) -> Evaluation<'s> {
        match self.get(key) {
            Some(flag) => self.evaluate_flag(flag, ctx),
            None => Evaluation::not_found(),
        }
    }

    /// Evaluates a flag of this set (from `get` or `flags`) for `ctx`,
    /// without looking it up again.
    pub fn evaluate_flag<'s>(
        &'s self,
        flag: &'s CompiledFlag,
        ctx: &Context<'_>,
    ) -> Evaluation<'s> {
        let mut budget = MAX_PREREQUISITE_EVALUATIONS;
        self.eval(flag, ctx, &mut budget, 0)
    }

    /// Every flag, ordered by key.
    pub fn flags(&self) -> impl Iterator<Item = &CompiledFlag> {
        let ordered = self.ordered.get_or_init(|| {
            let order = self.order.get_or_init(|| {
                let mut keys: Vec<Arc<str>> = self.flags.iter().map(|(k, _)| k.clone()).collect();
                keys.sort_unstable();
                keys.into()
            });
            order
                .iter()
                .filter_map(|k| self.flags.get(k).cloned())
                .collect()
        });
        ordered.iter().map(|f| &**f)
    }

    /// Every segment, ordered by key.
    pub fn segments(&self) -> impl Iterator<Item = &model::Segment> {
        self.segments.values().map(|s| &s.source)
    }

    /// The segment with this key.
    pub fn segment(&self, key: &str) -> Option<&model::Segment> {
        self.segments.get(key).map(|s| &s.source)
    }

    /// Number of flags.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no flags.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn recompile_users(&mut self, segment: &str) {
        let users: Vec<model::Flag> = self
            .flags
            .iter()
            .map(|(_, f)| f)
            .filter(|f| f.uses_segment(segment))
            .map(|f| f.source().clone())
            .collect();
        for flag in users {
            self.upsert_flag(flag);
        }
    }
}

impl std::fmt::Debug for FlagSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlagSet")
            .field("flags", &self.len)
            .field("segments", &self.segments.len())
            .finish()
    }
}

/// The shard of a key, from its length and first and last eight bytes: cheap,
/// and independent of the hash the shard's own map uses (so a shard's keys do
/// not crowd its buckets). Balance only affects how much a write copies.
#[inline]
fn shard_of(key: &str) -> usize {
    let b = key.as_bytes();
    let head = load(&b[..b.len().min(8)]);
    let tail = load(&b[b.len().saturating_sub(8)..]);
    let x = tail ^ head.rotate_left(29) ^ (b.len() as u64).rotate_left(47);
    (x.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - SHARDS.trailing_zeros())) as usize
}

/// Up to eight bytes as a little-endian word, without a `memcpy` call (which
/// would cost more than the rest of a short key's hash).
#[inline]
fn load(b: &[u8]) -> u64 {
    let n = b.len();
    if n >= 8 {
        u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
    } else if n >= 4 {
        // Two overlapping 4-byte reads; the overlap lines up, so this is
        // exactly the little-endian value of the n bytes.
        let lo = u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        let hi = u64::from(u32::from_le_bytes([b[n - 4], b[n - 3], b[n - 2], b[n - 1]]));
        lo | (hi << ((n - 4) * 8))
    } else if n > 0 {
        u64::from(b[0]) | (u64::from(b[n / 2]) << 8) | (u64::from(b[n - 1]) << 16)
    } else {
        0
    }
}

/// The hasher of the engine's maps: keys are short strings chosen by admins
/// and lookups never insert, so a fast non-keyed hash is safe here.
pub(crate) type FastHash = BuildHasherDefault<FxHasher>;

/// The Fx hash (from rustc): a multiply and rotate per word.
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher {
    hash: u64,
}

const FX_K: u64 = 0x517c_c1b7_2722_0a95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(FX_K);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes([
                c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7],
            ]));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            self.add(load(rest) ^ ((rest.len() as u64) << 59));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        // A final avalanche so low bits (buckets) depend on every input bit.
        let h = self.hash;
        (h ^ (h >> 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (h >> 29)
    }
}

#[cfg(test)]
mod tests;
