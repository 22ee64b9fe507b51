//! Conversions between wire types and the model: everything the model can say
//! survives a round trip through `pb`, and structural errors in wire messages
//! are refused with the exact field path.

use flagstream::convert::FieldError;
use flagstream::model::{
    Attribute, Constraint, Flag, FlagType, Namespace, Operator, Override, Prerequisite, Rollout,
    Rule, Segment, Serve, Split, Stamp, Stickiness, Value, Variant, WeightedVariant,
};
use flagstream::pb;
use serde_json::json;

/// A flag that uses every part of the model, so a round trip exercises every
/// conversion.
fn rich_flag() -> Flag {
    let constraint = |attribute: Attribute, operator: Operator, values: &[&str]| Constraint {
        attribute,
        operator,
        values: values.iter().map(|v| v.to_string()).collect(),
        inverted: false,
        case_insensitive: false,
    };
    let all_operators = [
        Operator::In,
        Operator::NotIn,
        Operator::StrContains,
        Operator::StrStartsWith,
        Operator::StrEndsWith,
        Operator::NumEq,
        Operator::NumGt,
        Operator::NumGte,
        Operator::NumLt,
        Operator::NumLte,
        Operator::DateAfter,
        Operator::DateBefore,
        Operator::SemverEq,
        Operator::SemverGt,
        Operator::SemverGte,
        Operator::SemverLt,
        Operator::SemverLte,
        Operator::Regex,
        Operator::InCidr,
    ];
    let attributes = [
        Attribute::TargetingKey,
        Attribute::UserId,
        Attribute::SessionId,
        Attribute::RemoteAddress,
        Attribute::Environment,
        Attribute::AppName,
        Attribute::CurrentTime,
        Attribute::Property("plan".into()),
    ];
    let constraints: Vec<Constraint> = all_operators
        .iter()
        .enumerate()
        .map(|(i, op)| {
            let mut c = constraint(
                attributes[i % attributes.len()].clone(),
                op.clone(),
                &["x", "y"],
            );
            c.inverted = i % 2 == 0;
            c.case_insensitive = i % 3 == 0;
            c
        })
        .collect();
    Flag {
        namespace: "production".into(),
        key: "checkout.new-flow".into(),
        description: "New checkout".into(),
        flag_type: FlagType::Json,
        variants: vec![
            Variant {
                name: "on".into(),
                value: Value::Json(
                    json!({"limit": 10, "ratio": 0.25, "tags": ["a", null, true], "nested": {"deep": {}}}),
                ),
                description: "enabled".into(),
            },
            Variant {
                name: "off".into(),
                value: Value::Json(json!(null)),
                description: String::new(),
            },
            Variant {
                name: "list".into(),
                value: Value::Json(json!([1, -2, 3.5, "s"])),
                description: String::new(),
            },
        ],
        enabled: true,
        disabled_variant: "off".into(),
        default_variant: "off".into(),
        rules: vec![
            Rule {
                name: "all operators".into(),
                constraints,
                segments: vec!["beta".into(), "staff".into()],
                rollout: Some(Rollout {
                    percentage: 50,
                    stickiness: Stickiness::Attribute(Attribute::Property("tenant".into())),
                    group_id: Some("g1".into()),
                }),
                serve: Serve::Variant("on".into()),
            },
            Rule {
                name: String::new(),
                constraints: vec![],
                segments: vec![],
                rollout: Some(Rollout {
                    percentage: 0,
                    stickiness: Stickiness::Random,
                    group_id: None,
                }),
                serve: Serve::Split(Split {
                    variants: vec![
                        WeightedVariant {
                            variant: "on".into(),
                            weight: 300,
                        },
                        WeightedVariant {
                            variant: "list".into(),
                            weight: 700,
                        },
                    ],
                    stickiness: Stickiness::Attribute(Attribute::SessionId),
                    group_id: None,
                    overrides: vec![Override {
                        attribute: Attribute::UserId,
                        values: vec!["u1".into(), "u2".into()],
                        variant: "list".into(),
                    }],
                }),
            },
            Rule {
                name: "default stickiness".into(),
                constraints: vec![],
                segments: vec![],
                rollout: None,
                serve: Serve::Split(Split {
                    variants: vec![WeightedVariant {
                        variant: "on".into(),
                        weight: 1,
                    }],
                    stickiness: Stickiness::Default,
                    group_id: Some("shared".into()),
                    overrides: vec![],
                }),
            },
        ],
        prerequisites: vec![
            Prerequisite {
                flag: "parent".into(),
                expect_off: false,
                variants: vec!["a".into()],
            },
            Prerequisite {
                flag: "legacy".into(),
                expect_off: true,
                variants: vec![],
            },
        ],
        tags: vec!["team-a".into(), "q3".into()],
        metadata: flagstream::model::Metadata::from([
            ("owner".into(), "ana".into()),
            ("ticket".into(), "FS-1".into()),
        ]),
        stamp: Stamp {
            created_revision: 3,
            updated_revision: 9,
            updated_at_ms: 1_700_000_000_123,
            updated_by: "ci".into(),
        },
    }
}

fn simple_flag(flag_type: FlagType, on: Value, off: Value) -> Flag {
    Flag {
        namespace: "ns".into(),
        key: "k".into(),
        description: String::new(),
        flag_type,
        variants: vec![
            Variant {
                name: "on".into(),
                value: on,
                description: String::new(),
            },
            Variant {
                name: "off".into(),
                value: off,
                description: String::new(),
            },
        ],
        enabled: false,
        disabled_variant: "off".into(),
        default_variant: "on".into(),
        rules: vec![],
        prerequisites: vec![],
        tags: vec![],
        metadata: flagstream::model::Metadata::new(),
        stamp: Stamp::default(),
    }
}

#[test]
fn flags_round_trip() {
    let flags = [
        rich_flag(),
        simple_flag(FlagType::Boolean, Value::Bool(true), Value::Bool(false)),
        simple_flag(
            FlagType::String,
            Value::String("Feature.UTF-8.😊".into()),
            Value::String(String::new()),
        ),
        simple_flag(
            FlagType::Number,
            Value::Number(-1.5e300),
            Value::Number(0.0),
        ),
        simple_flag(
            FlagType::Json,
            Value::Json(json!({"a": {"b": [1, 2.5, "c"]}})),
            Value::Json(json!(false)),
        ),
    ];
    for flag in flags {
        let wire = pb::Flag::from(flag.clone());
        assert_eq!(Flag::try_from(wire), Ok(flag));
    }
}

#[test]
fn unsaved_stamp_is_absent_on_the_wire() {
    let wire = pb::Flag::from(simple_flag(
        FlagType::Boolean,
        Value::Bool(true),
        Value::Bool(false),
    ));
    assert_eq!(wire.stamp, None);
    let stamp = pb::Stamp::from(Stamp {
        updated_at_ms: -1,
        ..Stamp::default()
    });
    assert_eq!(
        stamp.updated_at,
        Some(prost_types::Timestamp {
            seconds: -1,
            nanos: 999_000_000
        })
    );
}

#[test]
fn segments_and_namespaces_round_trip() {
    let segment = Segment {
        namespace: "production".into(),
        key: "beta".into(),
        description: "beta testers".into(),
        constraints: rich_flag().rules[0].constraints.clone(),
        stamp: Stamp {
            created_revision: 1,
            updated_revision: 2,
            updated_at_ms: 5,
            updated_by: "me".into(),
        },
    };
    assert_eq!(
        Segment::try_from(pb::Segment::from(segment.clone())),
        Ok(segment)
    );
    let namespace = Namespace {
        key: "production".into(),
        description: "prod".into(),
        stamp: Stamp::default(),
    };
    assert_eq!(
        Namespace::try_from(pb::Namespace::from(namespace.clone())),
        Ok(namespace)
    );
}

#[test]
fn wire_defaults_map_to_the_model() {
    let mut wire = pb::Flag::from(rich_flag());
    let rule = &mut wire.rules[0];
    rule.rollout.as_mut().unwrap().stickiness = String::new();
    rule.constraints[10].attribute = String::new(); // DATE_AFTER defaults to currentTime.
    let flag = Flag::try_from(wire).unwrap();
    assert_eq!(
        flag.rules[0].rollout.as_ref().unwrap().stickiness,
        Stickiness::Default
    );
    assert_eq!(flag.rules[0].constraints[10].operator, Operator::DateAfter);
    assert_eq!(
        flag.rules[0].constraints[10].attribute,
        Attribute::CurrentTime
    );
}

fn json_number(n: f64) -> prost_types::Value {
    prost_types::Value {
        kind: Some(prost_types::value::Kind::NumberValue(n)),
    }
}

fn json_object(key: &str, value: prost_types::Value) -> prost_types::Value {
    prost_types::Value {
        kind: Some(prost_types::value::Kind::StructValue(prost_types::Struct {
            fields: [(key.to_string(), value)].into(),
        })),
    }
}

fn json_list(values: Vec<prost_types::Value>) -> prost_types::Value {
    prost_types::Value {
        kind: Some(prost_types::value::Kind::ListValue(
            prost_types::ListValue { values },
        )),
    }
}

fn typed(kind: pb::typed_value::Kind) -> Option<pb::TypedValue> {
    Some(pb::TypedValue { kind: Some(kind) })
}

/// Converts `rich_flag()` after `mutate` and expects exactly `expected`.
fn check(mutate: impl FnOnce(&mut pb::Flag), expected: &str) {
    let mut wire = pb::Flag::from(rich_flag());
    mutate(&mut wire);
    match Flag::try_from(wire) {
        Ok(_) => panic!("accepted, expected {expected:?}"),
        Err(err) => assert_eq!(err.to_string(), expected),
    }
}

#[test]
fn structural_errors_name_the_field() {
    use pb::typed_value::Kind;
    check(|f| f.r#type = 0, "type: required");
    check(|f| f.r#type = 42, "type: unknown flag type 42");
    check(
        |f| f.variants[1].value = None,
        "variants[1].value: required",
    );
    check(
        |f| f.variants[1].value = Some(pb::TypedValue { kind: None }),
        "variants[1].value: required",
    );
    check(
        |f| f.variants[2].value = typed(Kind::StringValue("x".into())),
        "variants[2].value: expected json_value for a JSON flag, got string_value",
    );
    check(
        |f| {
            f.r#type = pb::FlagType::Number as i32;
            f.variants[0].value = typed(Kind::NumberValue(f64::NAN));
        },
        "variants[0].value.number_value: NaN is not a finite number",
    );
    check(
        |f| {
            f.variants[0].value = typed(Kind::JsonValue(json_object(
                "a",
                json_list(vec![json_number(1.0), json_number(f64::INFINITY)]),
            )))
        },
        r#"variants[0].value.json_value["a"][1]: inf is not a finite number"#,
    );
    check(
        |f| {
            f.variants[0].value = typed(Kind::JsonValue(json_object(
                "a",
                prost_types::Value { kind: None },
            )))
        },
        r#"variants[0].value.json_value["a"]: a JSON value must set one kind"#,
    );
    check(
        |f| {
            let mut deep = json_number(1.0);
            for _ in 0..32 {
                deep = json_list(vec![deep]);
            }
            f.variants[0].value = typed(Kind::JsonValue(deep));
        },
        &format!(
            "variants[0].value.json_value{}: JSON nested deeper than 31 levels",
            "[0]".repeat(31)
        ),
    );
    check(|f| f.rules[1].serve = None, "rules[1].serve: required");
    check(
        |f| f.rules[1].serve = Some(pb::Serve { kind: None }),
        "rules[1].serve: required",
    );
    check(
        |f| f.rules[0].constraints[3].operator = 0,
        "rules[0].constraints[3].operator: required",
    );
    check(
        |f| f.rules[0].constraints[3].operator = 99,
        "rules[0].constraints[3].operator: unknown operator 99",
    );
    check(
        |f| f.rules[0].constraints[2].attribute = String::new(),
        "rules[0].constraints[2].attribute: required",
    );
    check(
        |f| match &mut f.rules[1].serve.as_mut().unwrap().kind {
            Some(pb::serve::Kind::Split(split)) => split.overrides[0].attribute = String::new(),
            other => panic!("rule 1 serves {other:?}"),
        },
        "rules[1].serve.split.overrides[0].attribute: required",
    );
}

#[test]
fn json_nested_to_the_limit_is_accepted() {
    let mut deep = json_number(1.0);
    for _ in 0..flagstream::validate::MAX_JSON_DEPTH {
        deep = json_list(vec![deep]);
    }
    let value = Value::try_from(pb::TypedValue {
        kind: Some(pb::typed_value::Kind::JsonValue(deep)),
    });
    assert!(value.is_ok(), "{value:?}");
}

#[test]
fn field_error_paths_compose() {
    let err = FieldError::new("", "\"1.x\" is not a semantic version")
        .at_index("values", 1)
        .at_index("constraints", 0)
        .at_index("rules", 2);
    assert_eq!(
        err.to_string(),
        r#"rules[2].constraints[0].values[1]: "1.x" is not a semantic version"#
    );
    assert_eq!(FieldError::new("", "bad").to_string(), "bad");
    assert_eq!(
        FieldError::new("", "too long")
            .at_key("metadata", "own\"er")
            .to_string(),
        r#"metadata["own\"er"]: too long"#
    );
}
