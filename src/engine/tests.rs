//! Unit tests of the engine: every operator and its edge cases through one
//! data-driven `check`, then evaluation order, reasons, rollouts, splits,
//! prerequisites, segments and the `FlagSet` structure.

use std::collections::HashMap;

use super::*;
use crate::model::{
    Attribute, Constraint, Flag, FlagType, Operator, Override, Prerequisite, Rollout, Rule,
    Segment, Serve, Split, Stamp, Stickiness, Value, Variant, WeightedVariant,
};

fn variant(name: &str, value: Value) -> Variant {
    Variant {
        name: name.into(),
        value,
        description: String::new(),
    }
}

/// A BOOLEAN flag serving `on` from each of `rules` and `off` otherwise.
fn flag(key: &str, rules: Vec<Rule>) -> Flag {
    Flag {
        namespace: "test".into(),
        key: key.into(),
        description: String::new(),
        flag_type: FlagType::Boolean,
        variants: vec![
            variant("on", Value::Bool(true)),
            variant("off", Value::Bool(false)),
        ],
        enabled: true,
        disabled_variant: "off".into(),
        default_variant: "off".into(),
        rules,
        prerequisites: Vec::new(),
        tags: Vec::new(),
        metadata: crate::model::Metadata::new(),
        stamp: Stamp::default(),
    }
}

fn rule(constraints: Vec<Constraint>) -> Rule {
    Rule {
        name: String::new(),
        constraints,
        segments: Vec::new(),
        rollout: None,
        serve: Serve::Variant("on".into()),
    }
}

fn constraint(attribute: &str, operator: Operator, values: &[&str]) -> Constraint {
    Constraint {
        attribute: Attribute::from_name(attribute),
        operator,
        values: values.iter().map(|v| v.to_string()).collect(),
        inverted: false,
        case_insensitive: false,
    }
}

/// Context attributes of a case: `userId`, `remoteAddress`, `currentTime`
/// (RFC 3339) or a property.
fn with_context<R>(attrs: &[(&str, &str)], f: impl FnOnce(&Context<'_>) -> R) -> R {
    let mut props = HashMap::new();
    let mut ctx = Context::default();
    for (k, v) in attrs {
        match *k {
            "userId" => ctx.user_id = v,
            "targetingKey" => ctx.targeting_key = v,
            "sessionId" => ctx.session_id = v,
            "remoteAddress" => ctx.remote_address = v,
            "currentTime" => ctx.current_time_ms = parse::date_ms(v),
            _ => {
                props.insert(k.to_string(), v.to_string());
            }
        }
    }
    ctx.properties = Some(&props);
    f(&ctx)
}

/// One operator case: attribute, operator, operands, `inverted`,
/// `case_insensitive`, the context's value of the attribute (None = missing)
/// and whether the constraint should hold.
type Case<'a> = (
    &'a str,
    Operator,
    &'a [&'a str],
    bool,
    bool,
    Option<&'a str>,
    bool,
);

fn check(cases: &[Case<'_>]) {
    for (i, (attr, op, values, inverted, ci, value, expected)) in cases.iter().enumerate() {
        let mut c = constraint(attr, op.clone(), values);
        c.inverted = *inverted;
        c.case_insensitive = *ci;
        let mut set = FlagSet::new();
        set.upsert_flag(flag("f", vec![rule(vec![c])]));
        let attrs: Vec<(&str, &str)> = value.iter().map(|v| (*attr, *v)).collect();
        let got = with_context(&attrs, |ctx| set.evaluate("f", ctx).variant == Some("on"));
        assert_eq!(
            got, *expected,
            "case {i}: {attr} {op:?} {values:?} inverted={inverted} ci={ci} value={value:?}"
        );
    }
}

use Operator::*;

#[test]
fn string_operators() {
    check(&[
        ("x", In, &["a", "b"], false, false, Some("b"), true),
        ("x", In, &["a", "b"], false, false, Some("B"), false),
        ("x", In, &["a", "b"], false, true, Some("B"), true),
        ("x", In, &["A"], false, true, Some("a"), true),
        ("x", In, &["a", "b"], false, false, None, false),
        ("x", In, &["a", "b"], true, false, None, true),
        ("x", In, &["a", "b"], true, false, Some("a"), false),
        ("x", In, &[], false, false, Some("a"), false),
        ("x", In, &[], true, false, Some("a"), true),
        (
            "x",
            In,
            &["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
            false,
            false,
            Some("9"),
            true,
        ),
        (
            "x",
            In,
            &["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
            false,
            false,
            Some("10"),
            false,
        ),
        (
            "x",
            In,
            &["ÄBC", "1", "2", "3", "4", "5", "6", "7", "8"],
            false,
            true,
            Some("äbc"),
            true,
        ),
        ("userId", In, &["u1"], false, false, Some("u1"), true),
        ("targetingKey", In, &["t1"], false, false, Some("t1"), true),
        ("x", NotIn, &["a", "b"], false, false, Some("c"), true),
        ("x", NotIn, &["a", "b"], false, false, Some("a"), false),
        ("x", NotIn, &["a", "b"], false, false, None, true),
        ("x", NotIn, &["a", "b"], true, false, None, false),
        ("x", NotIn, &["a"], false, true, Some("A"), false),
        ("x", NotIn, &[], false, false, Some("a"), true),
        ("x", NotIn, &[], false, false, None, true),
        (
            "x",
            StrContains,
            &["ell"],
            false,
            false,
            Some("hello"),
            true,
        ),
        (
            "x",
            StrContains,
            &["ELL"],
            false,
            false,
            Some("hello"),
            false,
        ),
        ("x", StrContains, &["ELL"], false, true, Some("hEllo"), true),
        (
            "x",
            StrContains,
            &["x", "ll"],
            false,
            false,
            Some("hello"),
            true,
        ),
        ("x", StrContains, &["ell"], false, false, None, false),
        ("x", StrContains, &["ell"], true, false, None, true),
        (
            "x",
            StrContains,
            &["ell"],
            true,
            false,
            Some("hello"),
            false,
        ),
        ("x", StrContains, &[], false, false, Some("hello"), false),
        (
            "x",
            StrStartsWith,
            &["he"],
            false,
            false,
            Some("hello"),
            true,
        ),
        (
            "x",
            StrStartsWith,
            &["HE"],
            false,
            true,
            Some("hello"),
            true,
        ),
        (
            "x",
            StrStartsWith,
            &["he"],
            false,
            true,
            Some("HELLO"),
            true,
        ),
        (
            "x",
            StrStartsWith,
            &["lo"],
            false,
            false,
            Some("hello"),
            false,
        ),
        (
            "x",
            StrStartsWith,
            &["ÉC"],
            false,
            true,
            Some("école"),
            true,
        ),
        ("x", StrStartsWith, &["he"], false, false, None, false),
        ("x", StrEndsWith, &["lo"], false, false, Some("hello"), true),
        (
            "x",
            StrEndsWith,
            &["LO"],
            false,
            false,
            Some("hello"),
            false,
        ),
        ("x", StrEndsWith, &["LO"], false, true, Some("hello"), true),
        ("x", StrEndsWith, &["lo"], true, false, Some("hello"), false),
    ]);
}

#[test]
fn number_operators() {
    check(&[
        ("n", NumEq, &["12"], false, false, Some("12.0"), true),
        ("n", NumEq, &["12"], false, false, Some("13"), false),
        ("n", NumEq, &["12"], true, false, Some("13"), true),
        ("n", NumGt, &["12"], false, false, Some("13"), true),
        ("n", NumGt, &["12"], false, false, Some("12"), false),
        ("n", NumGte, &["12"], false, false, Some("12"), true),
        ("n", NumGte, &["12"], false, false, Some("11.9"), false),
        ("n", NumLt, &["12"], false, false, Some("-1"), true),
        ("n", NumLt, &["12"], false, false, Some("12"), false),
        ("n", NumLte, &["12"], false, false, Some("12"), true),
        ("n", NumLte, &["1e1"], false, false, Some("10"), true),
        // Missing attribute: false, then inverted.
        ("n", NumGt, &["1"], false, false, None, false),
        ("n", NumGt, &["1"], true, false, None, true),
        // An unparsable context value is false before inversion.
        ("n", NumGt, &["1"], false, false, Some("abc"), false),
        ("n", NumGt, &["1"], true, false, Some("abc"), true),
        // An unparsable operand never holds, inverted or not.
        ("n", NumGt, &["abc"], false, false, Some("5"), false),
        ("n", NumGt, &["abc"], true, false, Some("5"), false),
        ("n", NumGt, &[], false, false, Some("5"), false),
    ]);
}

#[test]
fn date_operators() {
    check(&[
        (
            "currentTime",
            DateAfter,
            &["2022-01-29T13:00:00.000Z"],
            false,
            false,
            Some("2022-01-30T13:00:00Z"),
            true,
        ),
        (
            "currentTime",
            DateAfter,
            &["2022-01-29T13:00:00.000Z"],
            false,
            false,
            Some("2022-01-29T13:00:00Z"),
            false,
        ),
        (
            "currentTime",
            DateBefore,
            &["2022-01-29T13:00:00.000Z"],
            false,
            false,
            Some("2022-01-28T13:00:00Z"),
            true,
        ),
        (
            "currentTime",
            DateBefore,
            &["2022-01-29T15:00:00+02:00"],
            false,
            false,
            Some("2022-01-29T12:59:59Z"),
            true,
        ),
        (
            "currentTime",
            DateBefore,
            &["2022-01-29T13:00:00Z"],
            true,
            false,
            Some("2022-01-28T13:00:00Z"),
            false,
        ),
        // Without a time in the context, the clock decides.
        (
            "currentTime",
            DateAfter,
            &["2000-01-01T00:00:00Z"],
            false,
            false,
            None,
            true,
        ),
        (
            "currentTime",
            DateBefore,
            &["2000-01-01T00:00:00Z"],
            false,
            false,
            None,
            false,
        ),
        (
            "currentTime",
            DateAfter,
            &["yesterday"],
            false,
            false,
            None,
            false,
        ),
        (
            "currentTime",
            DateAfter,
            &["yesterday"],
            true,
            false,
            None,
            false,
        ),
        // A date held by a property.
        (
            "d",
            DateAfter,
            &["2022-01-01T00:00:00Z"],
            false,
            false,
            Some("2023-01-01T00:00:00Z"),
            true,
        ),
        (
            "d",
            DateAfter,
            &["2022-01-01T00:00:00Z"],
            false,
            false,
            Some("not a date"),
            false,
        ),
        (
            "d",
            DateAfter,
            &["2022-01-01T00:00:00Z"],
            false,
            false,
            None,
            false,
        ),
        (
            "d",
            DateAfter,
            &["2022-01-01T00:00:00Z"],
            true,
            false,
            None,
            true,
        ),
    ]);
}

#[test]
fn semver_operators() {
    check(&[
        ("v", SemverEq, &["1.2.3"], false, false, Some("1.2.3"), true),
        (
            "v",
            SemverEq,
            &["1.2.3"],
            false,
            false,
            Some("1.2.4"),
            false,
        ),
        (
            "v",
            SemverGt,
            &["1.2.3"],
            false,
            false,
            Some("1.10.0"),
            true,
        ),
        (
            "v",
            SemverGt,
            &["1.2.3"],
            false,
            false,
            Some("1.2.3-beta.1"),
            false,
        ),
        (
            "v",
            SemverGte,
            &["1.2.3"],
            false,
            false,
            Some("1.2.3"),
            true,
        ),
        (
            "v",
            SemverLt,
            &["2.0.0"],
            false,
            false,
            Some("2.0.0-rc.1"),
            true,
        ),
        (
            "v",
            SemverLt,
            &["2.0.0-rc.2"],
            false,
            false,
            Some("2.0.0-rc.10"),
            false,
        ),
        (
            "v",
            SemverLte,
            &["2.0.0"],
            false,
            false,
            Some("2.0.0"),
            true,
        ),
        ("v", SemverLt, &["2.0.0"], true, false, Some("1.0.0"), false),
        ("v", SemverEq, &["1.2.3"], false, false, None, false),
        ("v", SemverEq, &["1.2.3"], true, false, None, true),
        (
            "v",
            SemverEq,
            &["1.2.3"],
            false,
            false,
            Some("v1.2.3"),
            false,
        ),
        (
            "v",
            SemverEq,
            &["v1.2.3"],
            false,
            false,
            Some("1.2.3"),
            false,
        ),
        (
            "v",
            SemverEq,
            &["v1.2.3"],
            true,
            false,
            Some("1.2.3"),
            false,
        ),
    ]);
}

#[test]
fn regex_and_cidr_operators() {
    check(&[
        ("x", Regex, &["^cat$"], false, false, Some("cat"), true),
        ("x", Regex, &["^cat$"], false, false, Some("Cat"), false),
        ("x", Regex, &["^cat$"], false, true, Some("Cat"), true),
        (
            "x",
            Regex,
            &["dog", "^cat"],
            false,
            false,
            Some("catalog"),
            true,
        ),
        ("x", Regex, &["(bad"], false, false, Some("x"), false),
        ("x", Regex, &["(bad"], true, false, Some("x"), false),
        ("x", Regex, &["(bad", "x"], false, false, Some("x"), true),
        ("x", Regex, &["^cat$"], false, false, None, false),
        ("x", Regex, &["^cat$"], true, false, None, true),
        ("x", Regex, &[], false, false, Some("x"), false),
        (
            "remoteAddress",
            InCidr,
            &["10.0.0.0/8"],
            false,
            false,
            Some("10.1.2.3"),
            true,
        ),
        (
            "remoteAddress",
            InCidr,
            &["10.0.0.0/8"],
            false,
            false,
            Some("11.1.2.3"),
            false,
        ),
        (
            "remoteAddress",
            InCidr,
            &["10.1.2.3"],
            false,
            false,
            Some("10.1.2.3"),
            true,
        ),
        (
            "remoteAddress",
            InCidr,
            &["bad", "2001:db8::/32"],
            false,
            false,
            Some("2001:db8::1"),
            true,
        ),
        (
            "remoteAddress",
            InCidr,
            &["10.0.0.0/8"],
            false,
            false,
            Some("::ffff:10.0.0.1"),
            true,
        ),
        (
            "remoteAddress",
            InCidr,
            &["10.0.0.0/8"],
            false,
            false,
            Some("not an ip"),
            false,
        ),
        (
            "remoteAddress",
            InCidr,
            &["10.0.0.0/8"],
            true,
            false,
            Some("not an ip"),
            true,
        ),
        (
            "remoteAddress",
            InCidr,
            &["10.0.0.0/8"],
            false,
            false,
            None,
            false,
        ),
        (
            "remoteAddress",
            InCidr,
            &["bad"],
            false,
            false,
            Some("10.0.0.1"),
            false,
        ),
        (
            "remoteAddress",
            InCidr,
            &[],
            false,
            false,
            Some("10.0.0.1"),
            false,
        ),
    ]);
}

#[test]
fn unknown_operator_never_holds() {
    check(&[
        (
            "x",
            Unknown("NOT_A_VALID_OPERATOR".into()),
            &["a"],
            false,
            false,
            Some("a"),
            false,
        ),
        (
            "x",
            Unknown("NOT_A_VALID_OPERATOR".into()),
            &["a"],
            true,
            false,
            Some("a"),
            false,
        ),
    ]);
}

fn eval(
    set: &FlagSet,
    key: &str,
    attrs: &[(&str, &str)],
) -> (Option<String>, Reason, Option<usize>) {
    with_context(attrs, |ctx| {
        let e = set.evaluate(key, ctx);
        (e.variant.map(str::to_string), e.reason, e.rule_index)
    })
}

#[test]
fn evaluation_order_and_reasons() {
    let mut set = FlagSet::new();
    set.upsert_flag(flag("static", vec![]));
    let mut off = flag("off", vec![rule(vec![])]);
    off.enabled = false;
    set.upsert_flag(off);
    set.upsert_flag(flag(
        "targeted",
        vec![
            rule(vec![constraint("x", In, &["a"])]),
            rule(vec![constraint("x", In, &["b"])]),
        ],
    ));
    let mut broken = flag("broken", vec![]);
    broken.default_variant = "nope".into();
    set.upsert_flag(broken);

    assert_eq!(
        eval(&set, "static", &[]),
        (Some("off".into()), Reason::Static, None)
    );
    assert_eq!(
        eval(&set, "off", &[]),
        (Some("off".into()), Reason::Disabled, None)
    );
    assert_eq!(
        eval(&set, "targeted", &[("x", "b")]),
        (Some("on".into()), Reason::TargetingMatch, Some(1))
    );
    assert_eq!(
        eval(&set, "targeted", &[("x", "c")]),
        (Some("off".into()), Reason::Default, None)
    );
    assert_eq!(eval(&set, "missing", &[]), (None, Reason::Error, None));
    assert_eq!(
        set.evaluate("missing", &Context::default()).error,
        Some(ErrorCode::FlagNotFound)
    );
    let e = set.evaluate("broken", &Context::default());
    assert_eq!(
        (e.reason, e.error),
        (Reason::Error, Some(ErrorCode::General))
    );
    assert_eq!(
        set.evaluate("static", &Context::default()).value,
        Some(&Value::Bool(false))
    );
}

fn rollout_rule(percentage: u32, stickiness: Stickiness) -> Rule {
    let mut r = rule(vec![]);
    r.rollout = Some(Rollout {
        percentage,
        stickiness,
        group_id: None,
    });
    r
}

#[test]
fn rollout_gates() {
    let mut set = FlagSet::new();
    set.upsert_flag(flag("zero", vec![rollout_rule(0, Stickiness::Default)]));
    set.upsert_flag(flag("all", vec![rollout_rule(100, Stickiness::Default)]));
    set.upsert_flag(flag(
        "custom",
        vec![rollout_rule(
            100,
            Stickiness::Attribute(Attribute::from_name("org")),
        )],
    ));
    set.upsert_flag(flag("half", vec![rollout_rule(50, Stickiness::Default)]));
    assert_eq!(eval(&set, "zero", &[("userId", "u")]).1, Reason::Default);
    assert_eq!(eval(&set, "all", &[]).1, Reason::TargetingMatch);
    // A named stickiness attribute that is missing closes the gate, even at 100%.
    assert_eq!(eval(&set, "custom", &[]).1, Reason::Default);
    assert_eq!(
        eval(&set, "custom", &[("org", "o")]).1,
        Reason::TargetingMatch
    );
    // userId falls back to the targeting key, then sessionId.
    let by_user = eval(&set, "half", &[("userId", "k17")]);
    assert_eq!(eval(&set, "half", &[("targetingKey", "k17")]), by_user);
    assert_eq!(eval(&set, "half", &[("sessionId", "k17")]), by_user);
}

/// Shares of 100,000 keys let through by rollouts, and served by a split,
/// are within one percentage point of the configured ones, and stable.
#[test]
fn bucketing_is_stable_and_uniform() {
    const KEYS: usize = 100_000;
    let mut set = FlagSet::new();
    for pct in [1, 10, 25, 50, 75, 99] {
        set.upsert_flag(flag(
            &format!("r{pct}"),
            vec![rollout_rule(pct, Stickiness::Default)],
        ));
    }
    let mut split = flag("split", vec![]);
    split.variants.push(variant("third", Value::Bool(true)));
    split.rules = vec![Rule {
        serve: Serve::Split(Split {
            variants: vec![
                WeightedVariant {
                    variant: "on".into(),
                    weight: 200,
                },
                WeightedVariant {
                    variant: "off".into(),
                    weight: 300,
                },
                WeightedVariant {
                    variant: "third".into(),
                    weight: 500,
                },
            ],
            stickiness: Stickiness::Default,
            group_id: None,
            overrides: Vec::new(),
        }),
        ..rule(vec![])
    }];
    set.upsert_flag(split);
    let mut on = [0usize; 6];
    let mut served = HashMap::<&str, usize>::new();
    for i in 0..KEYS {
        let key = format!("user-{i}");
        let ctx = Context {
            user_id: &key,
            ..Context::default()
        };
        for (j, pct) in [1, 10, 25, 50, 75, 99].iter().enumerate() {
            let e = set.evaluate(&format!("r{pct}"), &ctx);
            if e.is_on() {
                on[j] += 1;
            }
            assert_eq!(
                set.evaluate(&format!("r{pct}"), &ctx).reason,
                e.reason,
                "stable"
            );
        }
        let e = set.evaluate("split", &ctx);
        assert_eq!(e.reason, Reason::Split);
        assert_eq!(set.evaluate("split", &ctx).variant, e.variant, "stable");
        *served.entry(e.variant.unwrap()).or_default() += 1;
    }
    let share = |n: usize| n as f64 * 100.0 / KEYS as f64;
    for (j, pct) in [1, 10, 25, 50, 75, 99].iter().enumerate() {
        assert!(
            (share(on[j]) - f64::from(*pct)).abs() <= 1.0,
            "{pct}%: {}",
            share(on[j])
        );
    }
    for (name, expected) in [("on", 20.0), ("off", 30.0), ("third", 50.0)] {
        let got = share(served[name]);
        assert!((got - expected).abs() <= 1.0, "{name}: {got}");
    }
}

#[test]
fn split_overrides_and_stickiness() {
    let mut set = FlagSet::new();
    let mut f = flag("s", vec![]);
    f.rules = vec![Rule {
        serve: Serve::Split(Split {
            variants: vec![
                WeightedVariant {
                    variant: "on".into(),
                    weight: 1,
                },
                WeightedVariant {
                    variant: "off".into(),
                    weight: 0,
                },
            ],
            stickiness: Stickiness::Attribute(Attribute::from_name("org")),
            group_id: Some("g".into()),
            overrides: vec![Override {
                attribute: Attribute::UserId,
                values: vec!["vip".into()],
                variant: "off".into(),
            }],
        }),
        ..rule(vec![])
    }];
    set.upsert_flag(f);
    assert_eq!(
        eval(&set, "s", &[("userId", "vip")]),
        (Some("off".into()), Reason::TargetingMatch, Some(0))
    );
    assert_eq!(
        eval(&set, "s", &[("org", "o")]),
        (Some("on".into()), Reason::Split, Some(0))
    );
    // A missing stickiness attribute falls back to a random choice.
    assert_eq!(
        eval(&set, "s", &[]),
        (Some("on".into()), Reason::Split, Some(0))
    );
    let mut zero = flag("zero", vec![]);
    zero.rules = vec![Rule {
        serve: Serve::Split(Split {
            variants: vec![WeightedVariant {
                variant: "on".into(),
                weight: 0,
            }],
            stickiness: Stickiness::Default,
            group_id: None,
            overrides: Vec::new(),
        }),
        ..rule(vec![])
    }];
    set.upsert_flag(zero);
    assert_eq!(
        set.evaluate("zero", &Context::default()).error,
        Some(ErrorCode::General)
    );
}

fn prerequisite(flag: &str, expect_off: bool, variants: &[&str]) -> Prerequisite {
    Prerequisite {
        flag: flag.into(),
        expect_off,
        variants: variants.iter().map(|v| v.to_string()).collect(),
    }
}

#[test]
fn prerequisites() {
    let mut set = FlagSet::new();
    set.upsert_flag(flag("parent-on", vec![]));
    set.upsert_flag(flag(
        "parent-default",
        vec![rule(vec![constraint("x", In, &["a"])])],
    ));
    let mut disabled = flag("parent-off", vec![]);
    disabled.enabled = false;
    set.upsert_flag(disabled);
    type PrerequisiteCase<'a> = (&'a [Prerequisite], &'a [(&'a str, &'a str)], Reason);
    let cases: &[PrerequisiteCase<'_>] = &[
        (
            &[prerequisite("parent-on", false, &[])],
            &[],
            Reason::Static,
        ),
        (
            &[prerequisite("parent-on", false, &["off"])],
            &[],
            Reason::Static,
        ),
        (
            &[prerequisite("parent-on", false, &["on"])],
            &[],
            Reason::PrerequisiteFailed,
        ),
        (
            &[prerequisite("parent-on", true, &[])],
            &[],
            Reason::PrerequisiteFailed,
        ),
        (
            &[prerequisite("parent-off", false, &[])],
            &[],
            Reason::PrerequisiteFailed,
        ),
        (
            &[prerequisite("parent-off", true, &[])],
            &[],
            Reason::Static,
        ),
        (
            &[prerequisite("parent-default", false, &[])],
            &[],
            Reason::PrerequisiteFailed,
        ),
        (
            &[prerequisite("parent-default", false, &[])],
            &[("x", "a")],
            Reason::Static,
        ),
        (
            &[prerequisite("parent-default", true, &[])],
            &[],
            Reason::Static,
        ),
        (
            &[prerequisite("missing", false, &[])],
            &[],
            Reason::PrerequisiteFailed,
        ),
        (
            &[prerequisite("missing", true, &[])],
            &[],
            Reason::PrerequisiteFailed,
        ),
        (
            &[
                prerequisite("parent-on", false, &[]),
                prerequisite("parent-off", true, &[]),
            ],
            &[],
            Reason::Static,
        ),
        (
            &[
                prerequisite("parent-on", false, &[]),
                prerequisite("parent-off", false, &[]),
            ],
            &[],
            Reason::PrerequisiteFailed,
        ),
    ];
    for (i, (prereqs, attrs, expected)) in cases.iter().enumerate() {
        let mut child = flag("child", vec![]);
        child.prerequisites = prereqs.to_vec();
        set.upsert_flag(child);
        let (variant, reason, _) = eval(&set, "child", attrs);
        assert_eq!(reason, *expected, "case {i}");
        // The child's default and disabled variants are both `off`.
        assert_eq!(variant.as_deref(), Some("off"));
    }
}

#[test]
fn prerequisite_cycles_and_chains_end() {
    let mut set = FlagSet::new();
    let mut a = flag("a", vec![]);
    a.prerequisites = vec![prerequisite("b", false, &[])];
    let mut b = flag("b", vec![]);
    b.prerequisites = vec![prerequisite("a", false, &[])];
    set.upsert_flag(a);
    set.upsert_flag(b);
    assert_eq!(eval(&set, "a", &[]).1, Reason::PrerequisiteFailed);
    // A chain within the depth limit holds; a longer one fails.
    for len in [MAX_PREREQUISITE_DEPTH - 1, MAX_PREREQUISITE_DEPTH + 2] {
        let mut set = FlagSet::new();
        set.upsert_flag(flag("c0", vec![]));
        for i in 1..=len {
            let mut f = flag(&format!("c{i}"), vec![]);
            f.prerequisites = vec![prerequisite(&format!("c{}", i - 1), false, &[])];
            set.upsert_flag(f);
        }
        let expected = if len < MAX_PREREQUISITE_DEPTH {
            Reason::Static
        } else {
            Reason::PrerequisiteFailed
        };
        assert_eq!(
            eval(&set, &format!("c{len}"), &[]).1,
            expected,
            "chain of {len}"
        );
    }
    // A wide fan-out stops at the evaluation budget instead of exploding.
    let mut set = FlagSet::new();
    set.upsert_flag(flag("leaf", vec![]));
    for level in 0..6 {
        let below = if level == 0 {
            vec!["leaf".to_string()]
        } else {
            (0..10).map(|i| format!("l{}-{i}", level - 1)).collect()
        };
        for i in 0..10 {
            let mut f = flag(&format!("l{level}-{i}"), vec![]);
            f.prerequisites = below.iter().map(|k| prerequisite(k, false, &[])).collect();
            set.upsert_flag(f);
        }
    }
    assert_eq!(eval(&set, "l5-0", &[]).1, Reason::PrerequisiteFailed);
}

fn segment(key: &str, constraints: Vec<Constraint>) -> Segment {
    Segment {
        namespace: "test".into(),
        key: key.into(),
        description: String::new(),
        constraints,
        stamp: Stamp::default(),
    }
}

#[test]
fn segments() {
    let mut set = FlagSet::new();
    let mut r = rule(vec![constraint("x", In, &["a"])]);
    r.segments = vec!["beta".into()];
    set.upsert_flag(flag("f", vec![r]));
    // A missing segment never matches.
    assert_eq!(
        eval(&set, "f", &[("x", "a"), ("y", "1")]).1,
        Reason::Default
    );
    set.upsert_segment(segment("beta", vec![constraint("y", In, &["1"])]));
    assert_eq!(
        eval(&set, "f", &[("x", "a"), ("y", "1")]).1,
        Reason::TargetingMatch
    );
    assert_eq!(
        eval(&set, "f", &[("x", "a"), ("y", "2")]).1,
        Reason::Default
    );
    // Updating the segment recompiles the flags using it.
    let before = set.clone();
    set.upsert_segment(segment("beta", vec![constraint("y", In, &["2"])]));
    assert_eq!(
        eval(&set, "f", &[("x", "a"), ("y", "2")]).1,
        Reason::TargetingMatch
    );
    assert_eq!(
        eval(&before, "f", &[("x", "a"), ("y", "2")]).1,
        Reason::Default
    );
    assert!(set.remove_segment("beta"));
    assert!(!set.remove_segment("beta"));
    assert_eq!(
        eval(&set, "f", &[("x", "a"), ("y", "2")]).1,
        Reason::Default
    );
    assert_eq!(set.segments().count(), 0);
}

#[test]
fn flag_set_is_copy_on_write_and_ordered() {
    let mut set = FlagSet::new();
    for key in ["b", "a", "d", "c"] {
        set.upsert_flag(flag(key, vec![]));
    }
    let snapshot = set.clone();
    let mut changed = flag("a", vec![]);
    changed.default_variant = "on".into();
    changed.stamp.updated_revision = 7;
    set.upsert_flag(changed);
    assert!(set.remove_flag("d"));
    assert!(!set.remove_flag("d"));
    set.upsert_flag(flag("aa", vec![]));
    let keys = |s: &FlagSet| s.flags().map(|f| f.key().to_string()).collect::<Vec<_>>();
    assert_eq!(keys(&set), ["a", "aa", "b", "c"]);
    assert_eq!(keys(&snapshot), ["a", "b", "c", "d"]);
    assert_eq!((set.len(), snapshot.len()), (4, 4));
    assert_eq!(set.get("a").map(CompiledFlag::revision), Some(7));
    assert_eq!(snapshot.get("a").map(CompiledFlag::revision), Some(0));
    assert_eq!(eval(&set, "a", &[]).0.as_deref(), Some("on"));
    assert_eq!(eval(&snapshot, "a", &[]).0.as_deref(), Some("off"));
    assert!(FlagSet::new().get("a").is_none());
    assert!(FlagSet::new().is_empty());
}

#[test]
fn flag_sets_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync + Clone + Default>() {}
    assert_send_sync::<FlagSet>();
}

/// Regexes live exactly as long as a compiled flag holds them: the cache shares
/// one pattern between flags, and deleting the flags gives the memory back.
/// The patterns are unique to this test, since the cache is process-wide and
/// other tests run alongside.
#[test]
fn regex_memory_follows_the_flags_holding_it() {
    let patterns: Vec<String> = (0..256)
        .map(|i| format!(r"^memory-test-{i}-[a-z]{{20}}\d+$"))
        .collect();
    let values: Vec<&str> = patterns.iter().map(String::as_str).collect();
    let live = |set: &[&str]| set.iter().filter(|p| regex_is_live(p, false)).count();

    let mut set = FlagSet::new();
    for (i, chunk) in values.chunks(64).enumerate() {
        let c = constraint("email", Operator::Regex, chunk);
        set.upsert_flag(flag(&format!("memory-{i}"), vec![rule(vec![c])]));
    }
    // A second flag with the same patterns shares the first one's regexes.
    let shared = constraint("email", Operator::Regex, &values[..64]);
    set.upsert_flag(flag("memory-shared", vec![rule(vec![shared])]));
    assert_eq!(live(&values), values.len());
    let held = |f: &str| match &set.get(f).unwrap().rules[0].constraints[0].op {
        compile::Op::Regex(r) => r.clone(),
        _ => unreachable!("a REGEX constraint compiles to Op::Regex"),
    };
    assert!(Arc::ptr_eq(&held("memory-0")[0], &held("memory-shared")[0]));
    with_context(
        &[("email", "memory-test-3-abcdefghijklmnopqrst42")],
        |ctx| {
            assert!(set.evaluate("memory-0", ctx).is_on());
            assert!(!set.evaluate("memory-1", ctx).is_on());
        },
    );

    // Dropping one of two holders keeps the pattern; dropping both frees it.
    set.remove_flag("memory-0");
    assert_eq!(live(&values), values.len());
    set.remove_flag("memory-shared");
    assert_eq!(live(&values[..64]), 0);
    assert_eq!(live(&values[64..]), 192);
    drop(set);
    assert_eq!(live(&values), 0, "no regex outlives the flags holding it");
}

/// Dead cache entries are pruned as new ones arrive, so compiling and dropping
/// many distinct patterns leaves a map proportional to what is live, not to
/// everything ever compiled.
#[test]
fn regex_cache_prunes_dead_entries() {
    for round in 0..10 {
        let patterns: Vec<String> = (0..100)
            .map(|i| format!(r"^prune-{round}-{i}-\d+$"))
            .collect();
        let values: Vec<&str> = patterns.iter().map(String::as_str).collect();
        let mut set = FlagSet::new();
        set.upsert_flag(flag(
            "prune",
            vec![rule(vec![constraint("email", Operator::Regex, &values)])],
        ));
        drop(set);
    }
    let entries = compile::regex_cache_entries();
    // 1,000 patterns were compiled and dropped; other tests hold a few dozen.
    assert!(
        entries < 500,
        "{entries} cache entries after all were dropped"
    );
}
