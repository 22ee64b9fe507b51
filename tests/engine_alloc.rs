//! Proves that evaluating typical flags does not allocate: a counting global
//! allocator records the allocations made on the test's thread while it
//! evaluates flags with constraints, rollouts, splits, prerequisites and
//! segments.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;

use flagstream::engine::{Context, FlagSet};
use flagstream::model::{
    Attribute, Constraint, Flag, FlagType, Operator, Override, Prerequisite, Rollout, Rule,
    Segment, Serve, Split, Stamp, Stickiness, Value, Variant, WeightedVariant,
};

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counters are const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn count() {
    let _ = COUNTING.try_with(|on| {
        if on.get() {
            let _ = COUNT.try_with(|c| c.set(c.get() + 1));
        }
    });
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocations made by `f` on this thread.
fn allocations(f: impl FnOnce()) -> usize {
    COUNT.with(|c| c.set(0));
    COUNTING.with(|on| on.set(true));
    f();
    COUNTING.with(|on| on.set(false));
    COUNT.with(Cell::get)
}

fn constraint(
    attribute: &str,
    operator: Operator,
    values: &[&str],
    case_insensitive: bool,
) -> Constraint {
    Constraint {
        attribute: Attribute::from_name(attribute),
        operator,
        values: values.iter().map(|v| v.to_string()).collect(),
        inverted: false,
        case_insensitive,
    }
}

fn flag(key: &str, rules: Vec<Rule>, prerequisites: Vec<Prerequisite>) -> Flag {
    let variant = |name: &str, value| Variant {
        name: name.into(),
        value,
        description: String::new(),
    };
    Flag {
        namespace: "ns".into(),
        key: key.into(),
        description: String::new(),
        flag_type: FlagType::String,
        variants: vec![
            variant("a", Value::String("A".into())),
            variant("b", Value::String("B".into())),
            variant("c", Value::String("C".into())),
        ],
        enabled: true,
        disabled_variant: "a".into(),
        default_variant: "a".into(),
        rules,
        prerequisites,
        tags: Vec::new(),
        metadata: flagstream::model::Metadata::new(),
        stamp: Stamp::default(),
    }
}

fn split(stickiness: Stickiness) -> Serve {
    Serve::Split(Split {
        variants: ["a", "b", "c"]
            .iter()
            .map(|v| WeightedVariant {
                variant: v.to_string(),
                weight: 333,
            })
            .collect(),
        stickiness,
        group_id: None,
        overrides: vec![Override {
            attribute: Attribute::UserId,
            values: vec!["vip".into()],
            variant: "c".into(),
        }],
    })
}

fn typical_flags() -> FlagSet {
    let mut set = FlagSet::new();
    set.upsert_segment(Segment {
        namespace: "ns".into(),
        key: "beta".into(),
        description: String::new(),
        constraints: vec![constraint("plan", Operator::In, &["pro", "team"], false)],
        stamp: Stamp::default(),
    });
    set.upsert_flag(flag("plain", vec![], vec![]));
    set.upsert_flag(flag(
        "targeted",
        vec![Rule {
            name: "eu adults".into(),
            constraints: vec![
                constraint("country", Operator::In, &["de", "fr", "nl"], false),
                constraint("email", Operator::StrStartsWith, &["ANNA"], true),
                constraint("age", Operator::NumGte, &["18"], false),
                constraint("version", Operator::SemverGte, &["1.2.0"], false),
                constraint(
                    "currentTime",
                    Operator::DateAfter,
                    &["2020-01-01T00:00:00Z"],
                    false,
                ),
                constraint("remoteAddress", Operator::InCidr, &["10.0.0.0/8"], false),
                constraint("email", Operator::Regex, &["@example\\.com$"], true),
                constraint("email", Operator::StrContains, &["EXAMPLE"], true),
            ],
            segments: vec!["beta".into()],
            rollout: Some(Rollout {
                percentage: 50,
                stickiness: Stickiness::Default,
                group_id: None,
            }),
            serve: split(Stickiness::Default),
        }],
        vec![],
    ));
    set.upsert_flag(flag(
        "random",
        vec![Rule {
            name: String::new(),
            constraints: vec![],
            segments: vec![],
            rollout: Some(Rollout {
                percentage: 50,
                stickiness: Stickiness::Random,
                group_id: None,
            }),
            serve: split(Stickiness::Random),
        }],
        vec![],
    ));
    set.upsert_flag(flag(
        "child",
        vec![],
        vec![
            Prerequisite {
                flag: "plain".into(),
                expect_off: false,
                variants: vec!["a".into()],
            },
            Prerequisite {
                flag: "targeted".into(),
                expect_off: false,
                variants: vec![],
            },
        ],
    ));
    set
}

#[test]
fn evaluation_does_not_allocate() {
    let set = typical_flags();
    let mut properties = HashMap::new();
    for (k, v) in [
        ("country", "de"),
        ("email", "Anna@EXAMPLE.com"),
        ("age", "42"),
        ("version", "1.4.2"),
        ("plan", "pro"),
    ] {
        properties.insert(k.to_string(), v.to_string());
    }
    let contexts: Vec<Context<'_>> = ["user-1", "user-2", "vip", "", "user-3"]
        .iter()
        .map(|user| Context {
            user_id: user,
            session_id: "s-1",
            remote_address: "10.1.2.3",
            properties: Some(&properties),
            ..Context::default()
        })
        .collect();
    let run = || {
        for ctx in &contexts {
            for key in ["plain", "targeted", "random", "child", "missing"] {
                std::hint::black_box(set.evaluate(key, ctx));
            }
            for flag in set.flags() {
                std::hint::black_box(set.evaluate_flag(flag, ctx));
            }
        }
    };
    // The first round fills lazily built caches (the key order, the regex
    // engine's scratch space, the random generator's state).
    run();
    // The constraints, segment and rollout let some of the contexts through,
    // so the split is exercised too.
    assert!(contexts.iter().any(|c| set.evaluate("targeted", c).is_on()));
    assert!(contexts.iter().any(|c| set.evaluate("child", c).is_on()));
    assert_eq!(
        allocations(|| for _ in 0..100 {
            run()
        }),
        0
    );
}
