//! The evaluation edge: a wire context lent to the engine without allocating,
//! and engine results turned into `EvaluateResponse`s.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;

use flagstream::convert;
use flagstream::engine::{self, ErrorCode, Evaluation, FlagSet, Reason};
use flagstream::model::{Flag, FlagType, Rule, Serve, Stamp, Value, Variant};
use flagstream::pb;

/// Counts allocations made by the current thread, so the test below can
/// prove that building a context allocates nothing.
struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counter is a thread-local `Cell` that never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: same contract as ours, passed through.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours, passed through.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn wire_context() -> pb::Context {
    pb::Context {
        targeting_key: "t-1".into(),
        user_id: "u-1".into(),
        session_id: "s-1".into(),
        remote_address: "10.1.2.3".into(),
        environment: "prod".into(),
        app_name: "shop".into(),
        current_time: Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 250_000_000,
        }),
        properties: HashMap::from([("plan".into(), "pro".into())]),
    }
}

#[test]
fn context_borrows_every_field() {
    let wire = wire_context();
    let ctx = convert::context(&wire);
    assert!(std::ptr::eq(ctx.targeting_key, wire.targeting_key.as_str()));
    assert!(std::ptr::eq(ctx.user_id, wire.user_id.as_str()));
    assert!(std::ptr::eq(ctx.session_id, wire.session_id.as_str()));
    assert!(std::ptr::eq(
        ctx.remote_address,
        wire.remote_address.as_str()
    ));
    assert!(std::ptr::eq(ctx.environment, wire.environment.as_str()));
    assert!(std::ptr::eq(ctx.app_name, wire.app_name.as_str()));
    assert!(std::ptr::eq(ctx.properties.unwrap(), &wire.properties));
    assert_eq!(ctx.current_time_ms, Some(1_700_000_000_250));

    let absent: Option<pb::Context> = None;
    let empty = absent.as_ref().map(convert::context).unwrap_or_default();
    assert_eq!(empty.current_time_ms, None);
    assert!(empty.properties.is_none());
    assert_eq!(empty.targeting_key, "");
    let blank = pb::Context::default();
    assert!(convert::context(&blank).properties.is_none());
}

#[test]
fn context_does_not_allocate() {
    let wire = wire_context();
    let before = ALLOCATIONS.with(Cell::get);
    let ctx = convert::context(&wire);
    let after = ALLOCATIONS.with(Cell::get);
    assert_eq!(after - before, 0);
    assert_eq!(ctx.app_name, "shop");
}

#[test]
fn reasons_and_error_codes_map_one_to_one() {
    let reasons = [
        (Reason::Static, pb::Reason::Static),
        (Reason::TargetingMatch, pb::Reason::TargetingMatch),
        (Reason::Split, pb::Reason::Split),
        (Reason::Default, pb::Reason::Default),
        (Reason::Disabled, pb::Reason::Disabled),
        (Reason::PrerequisiteFailed, pb::Reason::PrerequisiteFailed),
        (Reason::Error, pb::Reason::Error),
    ];
    for (engine_reason, wire) in reasons {
        assert_eq!(pb::Reason::from(engine_reason), wire);
    }
    let codes = [
        (ErrorCode::FlagNotFound, pb::ErrorCode::FlagNotFound),
        (ErrorCode::TypeMismatch, pb::ErrorCode::TypeMismatch),
        (ErrorCode::General, pb::ErrorCode::General),
    ];
    for (code, wire) in codes {
        assert_eq!(pb::ErrorCode::from(code), wire);
    }
}

fn flag() -> Flag {
    Flag {
        namespace: "production".into(),
        key: "banner".into(),
        description: String::new(),
        flag_type: FlagType::String,
        variants: vec![
            Variant {
                name: "on".into(),
                value: Value::String("shown".into()),
                description: String::new(),
            },
            Variant {
                name: "off".into(),
                value: Value::String("hidden".into()),
                description: String::new(),
            },
        ],
        enabled: true,
        disabled_variant: "off".into(),
        default_variant: "off".into(),
        rules: vec![Rule {
            name: "everyone".into(),
            constraints: vec![],
            segments: vec![],
            rollout: None,
            serve: Serve::Variant("on".into()),
        }],
        prerequisites: vec![],
        tags: vec![],
        metadata: flagstream::model::Metadata::from([("owner".into(), "ana".into())]),
        stamp: Stamp {
            created_revision: 4,
            updated_revision: 7,
            updated_at_ms: 1,
            updated_by: "ci".into(),
        },
    }
}

/// Evaluates `key` in a namespace holding `flag()` (after `adjust` on the
/// result) and compares the response with `expected`.
fn check(key: &str, adjust: impl FnOnce(&mut Evaluation<'_>), expected: pb::EvaluateResponse) {
    let mut set = FlagSet::new();
    set.upsert_flag(flag());
    let wire = wire_context();
    let mut eval = set.evaluate(key, &convert::context(&wire));
    adjust(&mut eval);
    assert_eq!(convert::evaluation(key, &eval, 42), expected);
}

fn found(variant: &str, value: &str, reason: pb::Reason, rule_index: i32) -> pb::EvaluateResponse {
    pb::EvaluateResponse {
        flag_key: "banner".into(),
        value: Some(pb::TypedValue {
            kind: Some(pb::typed_value::Kind::StringValue(value.into())),
        }),
        variant: variant.into(),
        reason: reason as i32,
        error_code: pb::ErrorCode::Unspecified as i32,
        error_message: String::new(),
        rule_index,
        revision: 42,
        flag_revision: 7,
        r#type: pb::FlagType::String as i32,
        metadata: HashMap::from([("owner".into(), "ana".into())]),
    }
}

#[test]
fn evaluations_become_responses() {
    check(
        "banner",
        |_| {},
        found("on", "shown", pb::Reason::TargetingMatch, 0),
    );
    check(
        "banner",
        |eval| {
            eval.reason = engine::Reason::Default;
            eval.rule_index = None;
        },
        found("on", "shown", pb::Reason::Default, -1),
    );
    check(
        "missing",
        |_| {},
        pb::EvaluateResponse {
            flag_key: "missing".into(),
            reason: pb::Reason::Error as i32,
            error_code: pb::ErrorCode::FlagNotFound as i32,
            error_message: r#"flag "missing" not found"#.into(),
            rule_index: -1,
            revision: 42,
            ..pb::EvaluateResponse::default()
        },
    );
    check(
        "banner",
        |eval| {
            *eval = Evaluation {
                value: None,
                variant: None,
                variant_index: None,
                reason: Reason::Error,
                rule_index: None,
                error: Some(ErrorCode::TypeMismatch),
                ..*eval
            }
        },
        pb::EvaluateResponse {
            value: None,
            variant: String::new(),
            reason: pb::Reason::Error as i32,
            error_code: pb::ErrorCode::TypeMismatch as i32,
            error_message: r#"flag "banner" is a STRING flag"#.into(),
            ..found("", "", pb::Reason::Error, -1)
        },
    );
}

/// Decodes what `append_result` wrote for `key` (one `results` entry) and
/// compares it with what `convert::evaluation` builds for the same result.
fn assert_encoded_like_built(set: &FlagSet, key: &str, wire: &pb::Context, revision: u64) {
    use prost::Message;
    let ctx = convert::context(wire);
    let flag = set.get(key);
    let eval = match flag {
        Some(flag) => set.evaluate_flag(flag, &ctx),
        None => Evaluation::not_found(),
    };
    let encoded = flag.map(convert::EncodedFlag::new);
    let response = pb::EvaluateBatchResponse {
        encoded_results: {
            let mut buf = Vec::new();
            convert::append_result(&mut buf, 1, key, &eval, encoded.as_ref(), revision);
            buf
        },
        ..Default::default()
    };
    let decoded = pb::EvaluateBatchResponse::decode(&response.encode_to_vec()[..]).unwrap();
    let built = convert::evaluation(key, &eval, revision);
    assert_eq!(
        decoded.results,
        vec![built.clone()],
        "{key} at revision {revision} for {wire:?}"
    );
    // Decoders accept some non-canonical forms (a negative int32 in 5 bytes, say); the bytes
    // must be what prost writes. Only the order of metadata entries may differ, not the length.
    let canonical = pb::EvaluateBatchResponse {
        results: vec![built],
        ..Default::default()
    }
    .encode_to_vec();
    assert_eq!(
        response.encoded_results.len(),
        canonical.len(),
        "{key} at revision {revision}: not the canonical encoding"
    );
}

fn variant(name: &str, value: Value) -> Variant {
    Variant {
        name: name.into(),
        value,
        description: String::new(),
    }
}

#[test]
fn encoded_results_decode_to_the_built_response() {
    use flagstream::model::{Metadata, Split, Stickiness, WeightedVariant};
    let mut set = FlagSet::new();
    set.upsert_flag(flag());
    // Every value type, with and without metadata, one with no rules, one
    // disabled, one with a split, one naming a variant it lacks (an error).
    let json = serde_json::json!({"color": "blue", "sizes": [1, 2.5], "nested": {"on": true}});
    let typed = [
        (
            "bool",
            FlagType::Boolean,
            Value::Bool(true),
            Value::Bool(false),
        ),
        (
            "number",
            FlagType::Number,
            Value::Number(-2.5),
            Value::Number(0.0),
        ),
        (
            "json",
            FlagType::Json,
            Value::Json(json),
            Value::Json(serde_json::json!({})),
        ),
        (
            "empty-string",
            FlagType::String,
            Value::String(String::new()),
            Value::String("x".into()),
        ),
    ];
    for (key, flag_type, on, off) in typed {
        set.upsert_flag(Flag {
            key: key.into(),
            flag_type,
            variants: vec![variant("on", on), variant("off", off)],
            rules: vec![],
            default_variant: "on".into(),
            metadata: Metadata::default(),
            ..flag()
        });
    }
    set.upsert_flag(Flag {
        key: "disabled".into(),
        enabled: false,
        stamp: Stamp::default(),
        ..flag()
    });
    set.upsert_flag(Flag {
        key: "split".into(),
        metadata: Metadata::from([
            ("owner".into(), "ana".into()),
            ("ticket".into(), "FS-1".into()),
            ("".into(), "empty key".into()),
            ("empty value".into(), "".into()),
        ]),
        rules: vec![
            Rule {
                name: "nobody".into(),
                constraints: vec![],
                segments: vec!["missing-segment".into()],
                rollout: None,
                serve: Serve::Variant("off".into()),
            },
            Rule {
                name: "split".into(),
                constraints: vec![],
                segments: vec![],
                rollout: None,
                serve: Serve::Split(Split {
                    variants: vec![
                        WeightedVariant {
                            variant: "on".into(),
                            weight: 1,
                        },
                        WeightedVariant {
                            variant: "off".into(),
                            weight: 1,
                        },
                    ],
                    stickiness: Stickiness::Default,
                    group_id: None,
                    overrides: vec![],
                }),
            },
        ],
        ..flag()
    });
    // The first rule matching: rule index 0, which proto3 leaves out.
    set.upsert_flag(Flag {
        key: "first-rule".into(),
        rules: vec![Rule {
            name: "everyone".into(),
            constraints: vec![],
            segments: vec![],
            rollout: None,
            serve: Serve::Variant("on".into()),
        }],
        ..flag()
    });
    set.upsert_flag(Flag {
        key: "misconfigured".into(),
        default_variant: "gone".into(),
        rules: vec![],
        ..flag()
    });
    let keys = [
        "banner",
        "bool",
        "number",
        "json",
        "empty-string",
        "disabled",
        "split",
        "first-rule",
        "misconfigured",
        "missing",
    ];
    for user in 0..50 {
        let wire = pb::Context {
            user_id: format!("user-{user}"),
            ..wire_context()
        };
        for key in keys {
            for revision in [0, 1, u64::MAX] {
                assert_encoded_like_built(&set, key, &wire, revision);
            }
        }
    }
}
