//! Evaluating compiled flags for a context, without allocating in the common
//! path.

use std::time::{SystemTime, UNIX_EPOCH};

use super::compile::{
    Attr, Cmp, CompiledConstraint, CompiledFlag, CompiledPrerequisite, CompiledRollout,
    CompiledRule, CompiledServe, CompiledSplit, Op, Sticky, StrOp, net_contains,
};
use super::{Context, ErrorCode, Evaluation, FlagSet, MAX_PREREQUISITE_DEPTH, Reason, parse};
use crate::hash::{ROLLOUT_SEED, VARIANT_SEED, normalized};

/// ASCII values up to this many bytes are lowered in a stack buffer.
const LOWER_BUF: usize = 256;
/// A smaller buffer for the usual short values, cheaper to set up.
const SHORT_BUF: usize = 64;

impl FlagSet {
    pub(super) fn eval<'s>(
        &'s self,
        flag: &'s CompiledFlag,
        ctx: &Context<'_>,
        budget: &mut u32,
        depth: u32,
    ) -> Evaluation<'s> {
        if !flag.source.enabled {
            return serve(flag, flag.disabled, Reason::Disabled, None);
        }
        for p in flag.prerequisites.iter() {
            if !self.prerequisite_holds(p, ctx, budget, depth) {
                return serve(flag, flag.disabled, Reason::PrerequisiteFailed, None);
            }
        }
        if flag.rules.is_empty() {
            return serve(flag, flag.default, Reason::Static, None);
        }
        for (i, rule) in flag.rules.iter().enumerate() {
            if !rule_matches(rule, ctx) {
                continue;
            }
            return match &rule.serve {
                CompiledServe::Variant(v) => serve(flag, *v, Reason::TargetingMatch, Some(i)),
                CompiledServe::Split(split) => match choose(split, ctx) {
                    Some((v, reason)) => serve(flag, v, reason, Some(i)),
                    None => error(flag, Some(i)),
                },
            };
        }
        serve(flag, flag.default, Reason::Default, None)
    }

    fn prerequisite_holds(
        &self,
        p: &CompiledPrerequisite,
        ctx: &Context<'_>,
        budget: &mut u32,
        depth: u32,
    ) -> bool {
        if depth + 1 >= MAX_PREREQUISITE_DEPTH || *budget == 0 {
            return false;
        }
        *budget -= 1;
        let Some(parent) = self.get(&p.flag) else {
            return false;
        };
        let result = self.eval(parent, ctx, budget, depth + 1);
        if result.error.is_some() {
            return false;
        }
        if p.expect_off {
            return !result.is_on();
        }
        result.is_on()
            && (p.variants.is_empty()
                || result
                    .variant
                    .is_some_and(|v| p.variants.iter().any(|w| &**w == v)))
    }
}

fn serve<'s>(
    flag: &'s CompiledFlag,
    variant: Option<usize>,
    reason: Reason,
    rule_index: Option<usize>,
) -> Evaluation<'s> {
    match variant.and_then(|i| Some((i, flag.source.variants.get(i)?))) {
        Some((i, v)) => Evaluation {
            flag: Some(flag),
            value: Some(&v.value),
            variant: Some(&v.name),
            variant_index: Some(i),
            reason,
            rule_index,
            error: None,
        },
        None => error(flag, rule_index),
    }
}

/// A configuration the engine cannot serve (a variant name the flag lacks, a
/// split without weight); write-time validation refuses these.
fn error(flag: &CompiledFlag, rule_index: Option<usize>) -> Evaluation<'_> {
    Evaluation {
        flag: Some(flag),
        value: None,
        variant: None,
        variant_index: None,
        reason: Reason::Error,
        rule_index,
        error: Some(ErrorCode::General),
    }
}

fn rule_matches(rule: &CompiledRule, ctx: &Context<'_>) -> bool {
    !rule.never
        && rule.constraints.iter().all(|c| holds(c, ctx))
        && rule
            .segments
            .iter()
            .all(|s| s.iter().all(|c| holds(c, ctx)))
        && rule.rollout.as_ref().is_none_or(|r| rollout_open(r, ctx))
}

impl<'a> Context<'a> {
    /// The value of a string attribute, `None` when absent.
    #[inline]
    fn value(&self, attr: &Attr) -> Option<&'a str> {
        let s = match attr {
            Attr::TargetingKey => self.targeting_key,
            Attr::UserId => {
                if self.user_id.is_empty() {
                    self.targeting_key
                } else {
                    self.user_id
                }
            }
            Attr::SessionId => self.session_id,
            Attr::RemoteAddress => self.remote_address,
            Attr::Environment => self.environment,
            Attr::AppName => self.app_name,
            // The time is a number here; only date operators read it.
            Attr::CurrentTime => "",
            Attr::Property(name) => return self.property(name),
        };
        (!s.is_empty()).then_some(s)
    }
}

impl<'a> Context<'a> {
    /// A property by name. A small map is scanned, which beats hashing the
    /// name with the map's SipHash.
    #[inline]
    fn property(&self, name: &str) -> Option<&'a str> {
        let props = self.properties?;
        if props.len() <= SCAN_PROPERTIES {
            props
                .iter()
                .find(|(k, _)| k.as_str() == name)
                .map(|(_, v)| v.as_str())
        } else {
            props.get(name).map(String::as_str)
        }
    }
}

/// Property maps up to this size are scanned rather than hashed.
const SCAN_PROPERTIES: usize = 8;

/// Whether a constraint holds for the context.
pub(super) fn holds(c: &CompiledConstraint, ctx: &Context<'_>) -> bool {
    let result = match &c.op {
        Op::Never => return false,
        Op::Date(cmp, operand) => {
            let time = match &c.attr {
                Attr::CurrentTime => Some(ctx.current_time_ms.unwrap_or_else(now_ms)),
                attr => ctx.value(attr).and_then(parse::date_ms),
            };
            time.is_some_and(|t| cmp.holds(t.cmp(operand)))
        }
        op => match ctx.value(&c.attr) {
            None => matches!(op, Op::NotIn(_)),
            Some(value) => op_holds(op, value),
        },
    };
    result != c.inverted
}

fn op_holds(op: &Op, value: &str) -> bool {
    match op {
        Op::Never | Op::Date(..) => false,
        Op::In(set) => {
            !set.is_empty() && with_lowercase(value, set.case_insensitive, |v| set.contains(v))
        }
        Op::NotIn(set) => {
            set.is_empty() || !with_lowercase(value, set.case_insensitive, |v| set.contains(v))
        }
        Op::Str {
            op,
            values,
            case_insensitive,
        } => str_holds(*op, values, *case_insensitive, value),
        Op::Num(cmp, operand) => parse::context_number(value).is_some_and(|n| match cmp {
            // Unleash compares numbers for equality within f64::EPSILON.
            Cmp::Eq => (n - operand).abs() < f64::EPSILON,
            cmp => n.partial_cmp(operand).is_some_and(|o| cmp.holds(o)),
        }),
        Op::Semver(cmp, operand) => parse::semver(value).is_some_and(|v| cmp.holds(v.cmp(operand))),
        Op::Regex(regexes) => regexes.iter().any(|r| r.is_match(value)),
        Op::Cidr(nets) => {
            parse::context_ip(value).is_some_and(|ip| nets.iter().any(|n| net_contains(n, ip)))
        }
    }
}

/// Whether `value` contains / starts with / ends with one of `patterns`
/// (pre-lowered when case-insensitive). ASCII values are compared in place
/// without lowering them; others are lowered (allocating).
fn str_holds(op: StrOp, patterns: &[Box<str>], case_insensitive: bool, value: &str) -> bool {
    let plain = |v: &str, p: &str| match op {
        StrOp::Contains => v.contains(p),
        StrOp::StartsWith => v.starts_with(p),
        StrOp::EndsWith => v.ends_with(p),
    };
    if !case_insensitive {
        return patterns.iter().any(|p| plain(value, p));
    }
    if !value.is_ascii() {
        let lowered = value.to_lowercase();
        return patterns.iter().any(|p| plain(&lowered, p));
    }
    let v = value.as_bytes();
    // A lowered non-ASCII pattern cannot occur in a lowered ASCII value.
    patterns.iter().filter(|p| p.is_ascii()).any(|p| {
        let p = p.as_bytes();
        match op {
            StrOp::Contains => {
                p.is_empty() || v.windows(p.len()).any(|w| w.eq_ignore_ascii_case(p))
            }
            StrOp::StartsWith => v.len() >= p.len() && v[..p.len()].eq_ignore_ascii_case(p),
            StrOp::EndsWith => v.len() >= p.len() && v[v.len() - p.len()..].eq_ignore_ascii_case(p),
        }
    })
}

/// Calls `f` with `s`, lowered when `lower` is set. ASCII values up to
/// `LOWER_BUF` bytes are lowered on the stack; only longer or non-ASCII
/// values with capitals allocate.
#[inline]
fn with_lowercase<R>(s: &str, lower: bool, f: impl FnOnce(&str) -> R) -> R {
    if !lower || (s.is_ascii() && !s.bytes().any(|b| b.is_ascii_uppercase())) {
        return f(s);
    }
    if s.is_ascii() && s.len() <= SHORT_BUF {
        let mut buf = [0u8; SHORT_BUF];
        return f(lower_ascii(s, &mut buf[..s.len()]));
    }
    if s.is_ascii() && s.len() <= LOWER_BUF {
        let mut buf = [0u8; LOWER_BUF];
        return f(lower_ascii(s, &mut buf[..s.len()]));
    }
    f(&s.to_lowercase())
}

fn lower_ascii<'b>(s: &str, buf: &'b mut [u8]) -> &'b str {
    buf.copy_from_slice(s.as_bytes());
    buf.make_ascii_lowercase();
    // Lowering ASCII keeps it ASCII, so this cannot fail.
    std::str::from_utf8(buf).unwrap_or_default()
}

/// The value hashed for stickiness.
enum StickyValue<'a> {
    Value(&'a str),
    Random,
    Missing,
}

fn sticky_value<'a>(sticky: &Sticky, ctx: &Context<'a>) -> StickyValue<'a> {
    match sticky {
        Sticky::Default => ctx
            .value(&Attr::UserId)
            .or_else(|| ctx.value(&Attr::SessionId))
            .map_or(StickyValue::Random, StickyValue::Value),
        Sticky::Random => StickyValue::Random,
        Sticky::Attribute(attr) => ctx
            .value(attr)
            .map_or(StickyValue::Missing, StickyValue::Value),
    }
}

fn rollout_open(r: &CompiledRollout, ctx: &Context<'_>) -> bool {
    if r.percentage == 0 {
        return false;
    }
    match sticky_value(&r.stickiness, ctx) {
        StickyValue::Missing => false,
        StickyValue::Random => r.percentage >= 100 || fastrand::u32(1..=100) <= r.percentage,
        StickyValue::Value(v) => {
            if r.percentage >= 100 {
                return true;
            }
            normalized(&r.group, v, 100, ROLLOUT_SEED) <= u64::from(r.percentage)
        }
    }
}

/// Chooses a variant of a split: overrides first, then the sticky weighted
/// choice. `None` when the split has no weight.
fn choose(split: &CompiledSplit, ctx: &Context<'_>) -> Option<(Option<usize>, Reason)> {
    for (attr, values, variant) in split.overrides.iter() {
        if ctx.value(attr).is_some_and(|v| values.contains(v)) {
            return Some((*variant, Reason::TargetingMatch));
        }
    }
    if split.total == 0 {
        return None;
    }
    let target = match sticky_value(&split.stickiness, ctx) {
        StickyValue::Value(v) => normalized(&split.group, v, split.total, VARIANT_SEED),
        StickyValue::Random | StickyValue::Missing => fastrand::u64(1..=split.total),
    };
    split
        .variants
        .iter()
        .find(|(_, cumulative)| *cumulative >= target)
        .map(|(variant, _)| (*variant, Reason::Split))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
