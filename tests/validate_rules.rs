//! Write-time validation: every rule `validate` enforces, each as one case of
//! a valid base (namespace, segment, flag, context) plus a mutation, with the
//! exact message an admin would read.

use std::collections::HashMap;

use flagstream::model::{
    Attribute, Constraint, Flag, FlagType, Namespace, Operator, Override, Prerequisite, Rollout,
    Rule, Segment, Serve, Split, Stamp, Stickiness, Value, Variant, WeightedVariant,
};
use flagstream::pb;
use flagstream::validate::{self, MemoryView};
use serde_json::json;

/// Everything one case can mutate. The base is valid as a whole.
struct Fixture {
    namespace: Namespace,
    segment: Segment,
    flag: Flag,
    /// The rest of the namespace the flag is written into.
    view: MemoryView,
    context: pb::Context,
    batch: Vec<String>,
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

fn variant(name: &str, value: Value) -> Variant {
    Variant {
        name: name.into(),
        value,
        description: String::new(),
    }
}

fn simple_flag(key: &str, prerequisites: &[&str]) -> Flag {
    Flag {
        namespace: "production".into(),
        key: key.into(),
        description: String::new(),
        flag_type: FlagType::Boolean,
        variants: vec![
            variant("a", Value::Bool(true)),
            variant("b", Value::Bool(false)),
        ],
        enabled: true,
        disabled_variant: "b".into(),
        default_variant: "a".into(),
        rules: vec![],
        prerequisites: prerequisites
            .iter()
            .map(|p| Prerequisite {
                flag: p.to_string(),
                expect_off: false,
                variants: vec![],
            })
            .collect(),
        tags: vec![],
        metadata: flagstream::model::Metadata::new(),
        stamp: Stamp::default(),
    }
}

fn base() -> Fixture {
    let constraints = vec![
        constraint("userId", Operator::In, &["u1", "u2"]),
        constraint("plan", Operator::NotIn, &["free"]),
        constraint("email", Operator::StrEndsWith, &["@example.com"]),
        constraint("age", Operator::NumGte, &["18"]),
        constraint(
            "currentTime",
            Operator::DateAfter,
            &["2024-01-01T00:00:00Z"],
        ),
        constraint("version", Operator::SemverLt, &["2.0.0-beta.1"]),
        constraint("email", Operator::Regex, &["^[a-z]+@", "(?i)admin"]),
        constraint(
            "remoteAddress",
            Operator::InCidr,
            &["10.0.0.0/8", "2001:db8::/32", "192.168.1.7"],
        ),
    ];
    let flag = Flag {
        namespace: "production".into(),
        key: "checkout.new-flow".into(),
        description: "The new checkout".into(),
        flag_type: FlagType::String,
        variants: vec![
            variant("on", Value::String("new".into())),
            variant("off", Value::String("old".into())),
            variant("blue", Value::String("blue".into())),
        ],
        enabled: true,
        disabled_variant: "off".into(),
        default_variant: "off".into(),
        rules: vec![
            Rule {
                name: "staff".into(),
                constraints,
                segments: vec!["beta".into()],
                rollout: Some(Rollout {
                    percentage: 100,
                    stickiness: Stickiness::Default,
                    group_id: None,
                }),
                serve: Serve::Variant("on".into()),
            },
            Rule {
                name: "experiment".into(),
                constraints: vec![],
                segments: vec![],
                rollout: Some(Rollout {
                    percentage: 50,
                    stickiness: Stickiness::Attribute(Attribute::Property("tenant".into())),
                    group_id: Some("exp".into()),
                }),
                serve: Serve::Split(Split {
                    variants: vec![
                        WeightedVariant {
                            variant: "on".into(),
                            weight: 500_000,
                        },
                        WeightedVariant {
                            variant: "blue".into(),
                            weight: 500_000,
                        },
                    ],
                    stickiness: Stickiness::Default,
                    group_id: None,
                    overrides: vec![Override {
                        attribute: Attribute::UserId,
                        values: vec!["qa-1".into()],
                        variant: "blue".into(),
                    }],
                }),
            },
        ],
        prerequisites: vec![Prerequisite {
            flag: "parent".into(),
            expect_off: false,
            variants: vec!["a".into()],
        }],
        tags: vec!["checkout".into(), "team-a".into()],
        metadata: flagstream::model::Metadata::from([("owner".into(), "ana".into())]),
        stamp: Stamp::default(),
    };
    let mut view = MemoryView::default();
    view.segments.insert("beta".into());
    for f in [
        simple_flag("parent", &[]),
        simple_flag("legacy", &["parent"]),
    ] {
        view.flags.insert(f.key.clone(), f);
    }
    Fixture {
        namespace: Namespace {
            key: "production".into(),
            description: "live".into(),
            stamp: Stamp::default(),
        },
        segment: Segment {
            namespace: "production".into(),
            key: "beta".into(),
            description: "beta testers".into(),
            constraints: vec![constraint("beta", Operator::In, &["true"])],
            stamp: Stamp::default(),
        },
        flag,
        view,
        context: pb::Context {
            targeting_key: "u1".into(),
            properties: HashMap::from([("plan".into(), "pro".into())]),
            ..pb::Context::default()
        },
        batch: vec!["checkout.new-flow".into()],
    }
}

/// What `check` expects when a mutation must be accepted.
const ACCEPTED: &str = "";

/// Applies `mutate` to the valid base, validates every part of it, and expects
/// exactly one failure with message `expected` (or none for [`ACCEPTED`]).
#[track_caller]
fn check(mutate: impl FnOnce(&mut Fixture), expected: &str) {
    let mut fx = base();
    mutate(&mut fx);
    let results = [
        validate::namespace(&fx.namespace),
        validate::segment(&fx.segment),
        validate::flag(&fx.flag, &fx.view),
        validate::context(&fx.context),
        validate::batch_keys(&fx.batch),
    ];
    let errors: Vec<String> = results
        .into_iter()
        .filter_map(Result::err)
        .map(|e| e.to_string())
        .collect();
    let expected: Vec<String> = if expected.is_empty() {
        vec![]
    } else {
        vec![expected.to_string()]
    };
    assert_eq!(errors, expected);
}

fn rule0(fx: &mut Fixture) -> &mut Rule {
    &mut fx.flag.rules[0]
}

fn split1(fx: &mut Fixture) -> &mut Split {
    match &mut fx.flag.rules[1].serve {
        Serve::Split(split) => split,
        Serve::Variant(_) => unreachable!("the base's rule 1 serves a split"),
    }
}

#[test]
fn base_is_valid() {
    check(|_| {}, ACCEPTED);
}

#[test]
fn keys() {
    check(
        |fx| fx.flag.key = "Feature.UTF-8.😊_φriend_你好_🌍".into(),
        ACCEPTED,
    );
    check(|fx| fx.flag.key = "a".repeat(256), ACCEPTED);
    check(
        |fx| fx.flag.key = "a".repeat(257),
        "key: 257 bytes, at most 256 allowed",
    );
    check(|fx| fx.flag.key = String::new(), "key: required");
    check(
        |fx| fx.flag.key = "new flow".into(),
        r#"key: "new flow" is not a key: whitespace, control characters and '/' are not allowed"#,
    );
    check(
        |fx| fx.flag.key = "a/b".into(),
        r#"key: "a/b" is not a key: whitespace, control characters and '/' are not allowed"#,
    );
    check(
        |fx| fx.flag.key = "tab\u{7}".into(),
        r#"key: "tab\u{7}" is not a key: whitespace, control characters and '/' are not allowed"#,
    );
    check(
        |fx| fx.segment.key = "beta\n".into(),
        r#"key: "beta\n" is not a key: whitespace, control characters and '/' are not allowed"#,
    );
    check(|fx| fx.namespace.key = "0-stage_2.eu".into(), ACCEPTED);
    check(|fx| fx.namespace.key = "a".repeat(63), ACCEPTED);
    let namespace_rule = "is not a namespace key: 1 to 63 characters of a-z, 0-9, '.', '_' and '-', starting with a letter or digit";
    check(
        |fx| fx.namespace.key = "a".repeat(64),
        &format!("key: {:?} {namespace_rule}", "a".repeat(64)),
    );
    check(
        |fx| fx.namespace.key = "Production".into(),
        &format!("key: \"Production\" {namespace_rule}"),
    );
    check(
        |fx| fx.namespace.key = "-prod".into(),
        &format!("key: \"-prod\" {namespace_rule}"),
    );
    check(
        |fx| fx.namespace.key = "pröd".into(),
        &format!("key: \"pröd\" {namespace_rule}"),
    );
    check(|fx| fx.namespace.key = String::new(), "key: required");
    check(
        |fx| fx.flag.namespace = "Prod".into(),
        &format!("namespace: \"Prod\" {namespace_rule}"),
    );
    check(
        |fx| fx.segment.namespace = "a b".into(),
        &format!("namespace: \"a b\" {namespace_rule}"),
    );
}

#[test]
fn descriptions_tags_metadata() {
    check(|fx| fx.flag.description = "x".repeat(4096), ACCEPTED);
    check(
        |fx| fx.flag.description = "x".repeat(4097),
        "description: 4097 bytes, at most 4096 allowed",
    );
    check(
        |fx| fx.segment.description = "x".repeat(4097),
        "description: 4097 bytes, at most 4096 allowed",
    );
    check(
        |fx| fx.namespace.description = "x".repeat(1025),
        "description: 1025 bytes, at most 1024 allowed",
    );
    check(
        |fx| fx.flag.variants[2].description = "x".repeat(1025),
        "variants[2].description: 1025 bytes, at most 1024 allowed",
    );
    check(
        |fx| fx.flag.tags = (0..32).map(|i| i.to_string()).collect(),
        ACCEPTED,
    );
    check(
        |fx| fx.flag.tags = (0..33).map(|i| i.to_string()).collect(),
        "tags: 33 tags, at most 32 allowed",
    );
    check(|fx| fx.flag.tags[1] = String::new(), "tags[1]: required");
    check(
        |fx| fx.flag.tags[0] = "t".repeat(65),
        "tags[0]: 65 bytes, at most 64 allowed",
    );
    check(
        |fx| fx.flag.metadata = (0..65).map(|i| (i.to_string(), String::new())).collect(),
        "metadata: 65 entries, at most 64 allowed",
    );
    check(
        |fx| {
            fx.flag.metadata.insert(String::new(), "x".into());
        },
        "metadata: keys must not be empty",
    );
    check(
        |fx| {
            fx.flag.metadata.insert("k".repeat(129), "x".into());
        },
        "metadata: a key of 129 bytes, at most 128 allowed",
    );
    check(
        |fx| {
            fx.flag.metadata.insert("ticket".into(), "x".repeat(1025));
        },
        r#"metadata["ticket"]: 1025 bytes, at most 1024 allowed"#,
    );
}

#[test]
fn variants() {
    check(
        |fx| fx.flag.variants.clear(),
        "variants: at least one variant is required",
    );
    check(
        |fx| {
            fx.flag.variants = (0..101)
                .map(|i| variant(&format!("v{i}"), Value::String(String::new())))
                .collect();
            fx.flag.variants[0].name = "off".into();
            fx.flag.variants[1].name = "on".into();
            fx.flag.variants[2].name = "blue".into();
        },
        "variants: 101 variants, at most 100 allowed",
    );
    check(
        |fx| fx.flag.variants[2].name = "on".into(),
        r#"variants[2].name: duplicate variant name "on" (also variants[0])"#,
    );
    check(
        |fx| fx.flag.variants[1].name = String::new(),
        "variants[1].name: required",
    );
    check(
        |fx| fx.flag.variants[2].name = "b\tlue".into(),
        r#"variants[2].name: "b\tlue" contains a control character"#,
    );
    check(
        |fx| fx.flag.variants[2].name = "n".repeat(257),
        "variants[2].name: 257 bytes, at most 256 allowed",
    );
    check(
        |fx| fx.flag.variants[1].value = Value::Bool(false),
        "variants[1].value: expected string_value for a STRING flag, got bool_value",
    );
    check(
        |fx| fx.flag.variants[0].value = Value::String("s".repeat(64 * 1024 + 1)),
        "variants[0].value.string_value: 65537 bytes, at most 65536 allowed",
    );
    check(
        |fx| {
            fx.flag.flag_type = FlagType::Number;
            for v in &mut fx.flag.variants {
                v.value = Value::Number(1.0);
            }
            fx.flag.variants[1].value = Value::Number(f64::INFINITY);
        },
        "variants[1].value.number_value: inf is not a finite number",
    );
    let nested = |levels: usize| {
        let mut v = json!(1);
        for _ in 0..levels {
            v = json!({ "a": v });
        }
        Value::Json(v)
    };
    let json_flag = |fx: &mut Fixture, levels: usize| {
        fx.flag.flag_type = FlagType::Json;
        for v in &mut fx.flag.variants {
            v.value = Value::Json(json!({"ok": [1, 2]}));
        }
        fx.flag.variants[2].value = nested(levels);
    };
    check(|fx| json_flag(fx, 31), ACCEPTED);
    check(
        |fx| json_flag(fx, 32),
        "variants[2].value.json_value: JSON nested deeper than 31 levels",
    );
}

#[test]
fn variant_references() {
    check(
        |fx| fx.flag.default_variant = "missing".into(),
        r#"default_variant: "missing" is not a variant of this flag"#,
    );
    check(
        |fx| fx.flag.default_variant = String::new(),
        "default_variant: required",
    );
    check(
        |fx| fx.flag.disabled_variant = "On".into(),
        r#"disabled_variant: "On" is not a variant of this flag"#,
    );
    check(
        |fx| rule0(fx).serve = Serve::Variant("red".into()),
        r#"rules[0].serve.variant: "red" is not a variant of this flag"#,
    );
    check(
        |fx| split1(fx).variants[1].variant = "red".into(),
        r#"rules[1].serve.split.variants[1].variant: "red" is not a variant of this flag"#,
    );
    check(
        |fx| split1(fx).overrides[0].variant = "red".into(),
        r#"rules[1].serve.split.overrides[0].variant: "red" is not a variant of this flag"#,
    );
}

#[test]
fn splits() {
    check(
        |fx| split1(fx).variants.clear(),
        "rules[1].serve.split.variants: at least one variant is required",
    );
    check(
        |fx| split1(fx).variants.iter_mut().for_each(|wv| wv.weight = 0),
        "rules[1].serve.split.variants: the weights add up to 0; at least one must be above 0",
    );
    check(|fx| split1(fx).variants[0].weight = 0, ACCEPTED);
    check(
        |fx| split1(fx).variants[1].weight = 500_001,
        "rules[1].serve.split.variants: the weights add up to 1000001, more than 1000000",
    );
    check(
        |fx| {
            split1(fx)
                .variants
                .iter_mut()
                .for_each(|wv| wv.weight = u32::MAX)
        },
        "rules[1].serve.split.variants: the weights add up to 8589934590, more than 1000000",
    );
    check(
        |fx| split1(fx).overrides[0].values.clear(),
        "rules[1].serve.split.overrides[0].values: at least one value is required",
    );
    check(
        |fx| split1(fx).overrides[0].attribute = Attribute::Property(String::new()),
        "rules[1].serve.split.overrides[0].attribute: required",
    );
    check(
        |fx| split1(fx).stickiness = Stickiness::Attribute(Attribute::Property(String::new())),
        "rules[1].serve.split.stickiness: required",
    );
}

#[test]
fn rules_and_rollouts() {
    let empty_rule = || Rule {
        name: String::new(),
        constraints: vec![],
        segments: vec![],
        rollout: None,
        serve: Serve::Variant("on".into()),
    };
    check(|fx| fx.flag.rules = vec![empty_rule(); 200], ACCEPTED);
    check(
        |fx| fx.flag.rules = vec![empty_rule(); 201],
        "rules: 201 rules, at most 200 allowed",
    );
    check(
        |fx| rule0(fx).name = "n".repeat(129),
        "rules[0].name: 129 bytes, at most 128 allowed",
    );
    check(
        |fx| fx.flag.rules[1].rollout.as_mut().unwrap().percentage = 101,
        "rules[1].rollout.percentage: 101 is more than 100",
    );
    check(
        |fx| fx.flag.rules[1].rollout.as_mut().unwrap().percentage = 0,
        ACCEPTED,
    );
    check(
        |fx| {
            fx.flag.rules[1].rollout.as_mut().unwrap().stickiness =
                Stickiness::Attribute(Attribute::Property("p".repeat(257)))
        },
        "rules[1].rollout.stickiness: 257 bytes, at most 256 allowed",
    );
}

#[test]
fn segments() {
    check(
        |fx| rule0(fx).segments.push("staff".into()),
        r#"rules[0].segments[1]: no segment "staff" in namespace "production""#,
    );
    check(
        |fx| rule0(fx).segments[0] = String::new(),
        "rules[0].segments[0]: required",
    );
    check(|fx| rule0(fx).segments = vec!["beta".into(); 20], ACCEPTED);
    check(
        |fx| rule0(fx).segments = vec!["beta".into(); 21],
        "rules[0].segments: 21 segments, at most 20 allowed",
    );
    check(
        |fx| fx.segment.constraints[0].values[0] = "v".repeat(4097),
        "constraints[0].values[0]: 4097 bytes, at most 4096 allowed",
    );
    check(
        |fx| fx.segment.constraints = vec![constraint("a", Operator::In, &["x"]); 101],
        "constraints: 101 constraints, at most 100 allowed",
    );
}

#[test]
fn constraints() {
    let set = |i: usize, c: Constraint| move |fx: &mut Fixture| rule0(fx).constraints[i] = c;
    check(
        set(
            0,
            constraint("userId", Operator::Unknown("STR_MATCHES".into()), &["x"]),
        ),
        r#"rules[0].constraints[0].operator: unknown operator "STR_MATCHES""#,
    );
    check(
        set(1, constraint("", Operator::In, &["x"])),
        "rules[0].constraints[1].attribute: required",
    );
    check(
        set(1, constraint(&"p".repeat(257), Operator::In, &["x"])),
        "rules[0].constraints[1].attribute: 257 bytes, at most 256 allowed",
    );
    check(
        set(1, constraint("plan", Operator::NotIn, &[])),
        "rules[0].constraints[1].values: at least one value is required",
    );
    check(
        set(0, constraint("userId", Operator::In, &vec!["u"; 1000])),
        ACCEPTED,
    );
    check(
        set(0, constraint("userId", Operator::In, &vec!["u"; 1001])),
        "rules[0].constraints[0].values: 1001 values, at most 1000 allowed",
    );
    check(
        |fx| rule0(fx).constraints[0].values[1] = "v".repeat(4097),
        "rules[0].constraints[0].values[1]: 4097 bytes, at most 4096 allowed",
    );
    check(
        |fx| rule0(fx).constraints = vec![constraint("a", Operator::In, &["x"]); 101],
        "rules[0].constraints: 101 constraints, at most 100 allowed",
    );
    // Single-value operators.
    check(
        set(3, constraint("age", Operator::NumGte, &["1", "2"])),
        "rules[0].constraints[3].values: NUM_GTE takes exactly one value, got 2",
    );
    check(
        set(4, constraint("currentTime", Operator::DateBefore, &[])),
        "rules[0].constraints[4].values: at least one value is required",
    );
    check(
        set(
            5,
            constraint("version", Operator::SemverEq, &["1.0.0", "2.0.0"]),
        ),
        "rules[0].constraints[5].values: SEMVER_EQ takes exactly one value, got 2",
    );
    // Operands that must parse.
    check(
        set(3, constraint("age", Operator::NumEq, &["abc"])),
        r#"rules[0].constraints[3].values[0]: "abc" is not a number"#,
    );
    check(
        set(3, constraint("age", Operator::NumLt, &["1e999"])),
        r#"rules[0].constraints[3].values[0]: "1e999" is not a number"#,
    );
    check(
        set(3, constraint("age", Operator::NumGt, &["-1.5e3"])),
        ACCEPTED,
    );
    check(
        set(
            4,
            constraint("currentTime", Operator::DateAfter, &["2024-01-01"]),
        ),
        r#"rules[0].constraints[4].values[0]: "2024-01-01" is not an RFC 3339 date"#,
    );
    check(
        set(
            4,
            constraint(
                "currentTime",
                Operator::DateBefore,
                &["2024-05-01T12:00:00.250+02:00"],
            ),
        ),
        ACCEPTED,
    );
    check(
        set(5, constraint("version", Operator::SemverGt, &["1.x"])),
        r#"rules[0].constraints[5].values[0]: "1.x" is not a semantic version"#,
    );
    check(
        set(5, constraint("version", Operator::SemverGte, &["v1.2.3"])),
        r#"rules[0].constraints[5].values[0]: "v1.2.3" is not a semantic version"#,
    );
    check(
        |fx| rule0(fx).constraints[7].values[1] = "2001:db8::/129".into(),
        r#"rules[0].constraints[7].values[1]: "2001:db8::/129" is not an IP address or CIDR range"#,
    );
    check(
        |fx| rule0(fx).constraints[7].values[2] = "example.com".into(),
        r#"rules[0].constraints[7].values[2]: "example.com" is not an IP address or CIDR range"#,
    );
    check(
        |fx| rule0(fx).constraints[6].values[1] = "(unclosed".into(),
        r#"rules[0].constraints[6].values[1]: "(unclosed" is not a valid regular expression: unclosed group"#,
    );
    check(
        |fx| rule0(fx).constraints[6].values[0] = "^(?=look)ahead".into(),
        r#"rules[0].constraints[6].values[0]: "^(?=look)ahead" is not a valid regular expression: look-around, including look-ahead and look-behind, is not supported"#,
    );
    check(
        |fx| rule0(fx).constraints[2].values = vec![String::new()],
        ACCEPTED,
    );
}

#[test]
fn prerequisites() {
    let prereq = |flag: &str, variants: &[&str]| Prerequisite {
        flag: flag.into(),
        expect_off: false,
        variants: variants.iter().map(|v| v.to_string()).collect(),
    };
    check(
        |fx| fx.flag.prerequisites.push(prereq("ghost", &[])),
        r#"prerequisites[1].flag: no flag "ghost" in namespace "production""#,
    );
    check(
        |fx| fx.flag.prerequisites[0].flag = String::new(),
        "prerequisites[0].flag: required",
    );
    check(
        |fx| fx.flag.prerequisites.push(prereq("checkout.new-flow", &[])),
        "prerequisites[1].flag: a flag cannot be its own prerequisite",
    );
    check(
        |fx| fx.flag.prerequisites[0].variants.push("z".into()),
        r#"prerequisites[0].variants[1]: "z" is not a variant of flag "parent""#,
    );
    check(
        |fx| fx.flag.prerequisites[0].expect_off = true,
        "prerequisites[0].variants: must be empty when expect_off is set",
    );
    check(
        |fx| fx.flag.prerequisites = vec![prereq("parent", &[]); 21],
        "prerequisites: 21 prerequisites, at most 20 allowed",
    );
    // A chain that already exists is fine; closing it into a loop is not.
    check(
        |fx| fx.flag.prerequisites.push(prereq("legacy", &["a"])),
        ACCEPTED,
    );
    check(
        |fx| {
            fx.view
                .flags
                .get_mut("parent")
                .unwrap()
                .prerequisites
                .push(prereq("checkout.new-flow", &[]));
        },
        r#"prerequisites[0].flag: "parent" forms a cycle: checkout.new-flow -> parent -> checkout.new-flow"#,
    );
    check(
        |fx| {
            fx.view
                .flags
                .get_mut("parent")
                .unwrap()
                .prerequisites
                .push(prereq("checkout.new-flow", &[]));
            fx.flag.prerequisites = vec![prereq("legacy", &[])];
        },
        r#"prerequisites[0].flag: "legacy" forms a cycle: checkout.new-flow -> legacy -> parent -> checkout.new-flow"#,
    );
    // The stored version of the flag being written does not count: its new
    // prerequisites replace the old ones.
    check(
        |fx| {
            let mut stored = fx.flag.clone();
            stored.prerequisites = vec![prereq("legacy", &[])];
            fx.view.flags.insert(stored.key.clone(), stored);
        },
        ACCEPTED,
    );
}

#[test]
fn prerequisites_the_engine_can_evaluate() {
    // `chain(fx, n)` stores c1 -> c2 -> ... -> cn and makes the flag require
    // c1, a chain of n edges below it.
    let chain = |fx: &mut Fixture, n: usize| {
        for i in 1..=n {
            let below: Vec<String> = if i < n {
                vec![format!("c{}", i + 1)]
            } else {
                vec![]
            };
            let below: Vec<&str> = below.iter().map(String::as_str).collect();
            let f = simple_flag(&format!("c{i}"), &below);
            fx.view.flags.insert(f.key.clone(), f);
        }
        fx.flag.prerequisites = vec![Prerequisite {
            flag: "c1".into(),
            expect_off: false,
            variants: vec![],
        }];
    };
    check(|fx| chain(fx, 7), ACCEPTED);
    check(
        |fx| chain(fx, 8),
        "prerequisites: a chain of more than 7 prerequisites cannot be evaluated",
    );
    // `fan(fx, k)`: the flag requires p0..p19, each of which requires k leaves.
    let fan = |fx: &mut Fixture, k: usize| {
        let leaves: Vec<String> = (0..k).map(|j| format!("leaf{j}")).collect();
        let leaves: Vec<&str> = leaves.iter().map(String::as_str).collect();
        fx.flag.prerequisites.clear();
        for i in 0..20 {
            let f = simple_flag(&format!("p{i}"), &leaves);
            fx.flag.prerequisites.push(Prerequisite {
                flag: f.key.clone(),
                expect_off: false,
                variants: vec![],
            });
            fx.view.flags.insert(f.key.clone(), f);
        }
        for leaf in leaves {
            fx.view
                .flags
                .insert(leaf.to_string(), simple_flag(leaf, &[]));
        }
    };
    check(|fx| fan(fx, 2), ACCEPTED); // 20 * (1 + 2) = 60 evaluations.
    check(
        |fx| fan(fx, 3), // 20 * (1 + 3) = 80 evaluations.
        "prerequisites: evaluating this flag would take more than 64 prerequisite evaluations",
    );
}

#[test]
fn context_limits() {
    check(
        |fx| fx.context.properties = (0..64).map(|i| (i.to_string(), String::new())).collect(),
        ACCEPTED,
    );
    check(
        |fx| fx.context.properties = (0..65).map(|i| (i.to_string(), String::new())).collect(),
        "properties: 65 properties, at most 64 allowed",
    );
    check(
        |fx| {
            fx.context.properties.insert("k".repeat(257), String::new());
        },
        "properties: a key of 257 bytes, at most 256 allowed",
    );
    check(
        |fx| {
            fx.context
                .properties
                .insert("plan".into(), "v".repeat(4097));
        },
        r#"properties["plan"]: 4097 bytes, at most 4096 allowed"#,
    );
    check(
        |fx| fx.context.user_id = "u".repeat(4097),
        "user_id: 4097 bytes, at most 4096 allowed",
    );
    check(|fx| fx.batch = vec!["k".into(); 1000], ACCEPTED);
    check(
        |fx| fx.batch = vec!["k".into(); 1001],
        "flag_keys: 1001 keys, at most 1000 allowed",
    );
}

#[test]
fn bundles_resolve_references_among_themselves() {
    let fx = base();
    let flags = vec![
        fx.flag.clone(),
        simple_flag("parent", &[]),
        simple_flag("legacy", &["parent"]),
    ];
    assert_eq!(
        validate::bundle(&flags, std::slice::from_ref(&fx.segment)),
        Ok(())
    );
    let err = validate::bundle(&flags, &[]).unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"flags[0].rules[0].segments[0]: no segment "beta" in namespace "production""#
    );
    let err = validate::bundle(&[flags[1].clone(), flags[1].clone()], &[]).unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"flags[1].key: duplicate flag key "parent""#
    );
    let err = validate::bundle(&[], &[fx.segment.clone(), fx.segment.clone()]).unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"segments[1].key: duplicate segment key "beta""#
    );
}

#[test]
fn a_compiled_namespace_is_a_view() {
    let fx = base();
    let mut set = flagstream::engine::FlagSet::new();
    set.upsert_segment(fx.segment.clone());
    set.upsert_flag(simple_flag("parent", &[]));
    assert_eq!(validate::flag(&fx.flag, &set), Ok(()));
    set.remove_segment("beta");
    let err = validate::flag(&fx.flag, &set).unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"rules[0].segments[0]: no segment "beta" in namespace "production""#
    );
}

#[test]
fn regex_budgets() {
    use validate::{MAX_NAMESPACE_REGEX_BYTES, MAX_OBJECT_REGEX_BYTES};
    let set = |values: Vec<String>| {
        move |fx: &mut Fixture| {
            let values: Vec<&str> = values.iter().map(String::as_str).collect();
            rule0(fx).constraints[0] = constraint("email", Operator::Regex, &values);
        }
    };
    check(
        set(vec![r"\w{10}".into()]),
        r"rules[0].constraints[0].values[0]: regex compiles to more than the 256 KiB limit (Unicode classes such as \w are large; (?-u) makes them ASCII)",
    );
    check(set(vec![r"(?-u)\w{50}".into()]), ACCEPTED);
    // Identical patterns count once.
    check(set(vec![r"\w{3}".into(); 1000]), ACCEPTED);

    // Distinct patterns of about 170 KiB each: the seventh or so is over the
    // budget per flag, and nothing after it is compiled.
    let heavy =
        |tag: &str| -> Vec<String> { (0..1000).map(|i| format!(r"\w{{3}}{tag}{i}")).collect() };
    let mut fx = base();
    set(heavy("f"))(&mut fx);
    let message = validate::flag(&fx.flag, &fx.view).unwrap_err().to_string();
    assert!(
        message.starts_with("rules[0].constraints[0].values[")
            && message.contains("over the 1 MiB budget per flag"),
        "{message}"
    );
    fx.segment.constraints[0] = constraint("email", Operator::Regex, &[r"\w{3}"; 1]);
    let one = validate::segment_measured(&fx.segment, 0).unwrap();
    assert_eq!(one, validate::segment_regex_bytes(&fx.segment));
    assert!((100 * 1024..256 * 1024).contains(&one), "{one} bytes");
    let values = heavy("s");
    fx.segment.constraints[0].values = values;
    let message = validate::segment(&fx.segment).unwrap_err().to_string();
    assert!(
        message.starts_with("constraints[0].values[")
            && message.contains("over the 1 MiB budget per segment"),
        "{message}"
    );

    // The rest of the namespace's regexes count against the namespace budget;
    // the value that crosses it is named (the base's last regex here).
    let mut fx = base();
    set(vec![r"\w{3}".into()])(&mut fx);
    let bytes = validate::flag_measured(&fx.flag, &fx.view).unwrap();
    assert_eq!(bytes, validate::flag_regex_bytes(&fx.flag));
    fx.view.regex_bytes = MAX_NAMESPACE_REGEX_BYTES - bytes;
    assert_eq!(validate::flag_measured(&fx.flag, &fx.view), Ok(bytes));
    fx.view.regex_bytes += 1;
    let message = validate::flag(&fx.flag, &fx.view).unwrap_err().to_string();
    assert!(
        message.starts_with(r#"rules[0].constraints[6].values[1]: with this regex namespace "production" uses 32.1 MiB"#)
            && message.ends_with("over the 32 MiB budget per namespace"),
        "{message}"
    );

    // A bundle is a whole namespace: its flags share the budget.
    let flags: Vec<Flag> = (0..MAX_NAMESPACE_REGEX_BYTES / MAX_OBJECT_REGEX_BYTES * 2)
        .map(|f| {
            let mut flag = simple_flag(&format!("f{f}"), &[]);
            let values: Vec<String> = (0..4).map(|i| format!(r"\w{{3}}b{f}-{i}")).collect();
            let values: Vec<&str> = values.iter().map(String::as_str).collect();
            flag.rules.push(Rule {
                name: String::new(),
                constraints: vec![constraint("email", Operator::Regex, &values)],
                segments: vec![],
                rollout: None,
                serve: Serve::Variant("a".into()),
            });
            flag
        })
        .collect();
    let message = validate::bundle(&flags, &[]).unwrap_err().to_string();
    assert!(
        message.starts_with("flags[")
            && message.contains(r#"namespace "production" uses"#)
            && message.ends_with("over the 32 MiB budget per namespace"),
        "{message}"
    );
}
