//! Engine benchmarks, each timed from the context as the API receives it (a
//! `pb::Context`, lent to the engine by `convert::context`) to the finished
//! `Evaluation`:
//! - `targeted`: a flag with 3 constraints (IN, case-insensitive
//!   STR_STARTS_WITH, NUM_GTE), a 50% rollout and 3 weighted variants;
//! - `plain`: an on/off flag without rules;
//! - `all_1000`: every flag of a namespace of 1,000 mixed flags;
//! - `compile_10000`: compiling 10,000 flags into a `FlagSet`.
//!
//! Each is measured twice: in wall-clock time (`targeted`, …) and in the
//! thread's on-CPU time (`cpu/targeted`, …, read from
//! `/proc/thread-self/schedstat`), which a machine shared with other work
//! inflates much less.
//!
//! Run with `cargo bench --bench engine` (add `-- --quick` for a short run).

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use flagstream::convert;
use flagstream::engine::FlagSet;
use flagstream::model::{
    Attribute, Constraint, Flag, FlagType, Operator, Prerequisite, Rollout, Rule, Segment, Serve,
    Split, Stamp, Stickiness, Value, Variant, WeightedVariant,
};
use flagstream::pb;

fn constraint(attribute: &str, operator: Operator, values: &[&str], ci: bool) -> Constraint {
    Constraint {
        attribute: Attribute::from_name(attribute),
        operator,
        values: values.iter().map(|v| v.to_string()).collect(),
        inverted: false,
        case_insensitive: ci,
    }
}

fn base(key: &str) -> Flag {
    let variant = |name: &str, value: &str| Variant {
        name: name.into(),
        value: Value::String(value.into()),
        description: String::new(),
    };
    Flag {
        namespace: "bench".into(),
        key: key.into(),
        description: String::new(),
        flag_type: FlagType::String,
        variants: vec![
            variant("control", "c"),
            variant("blue", "b"),
            variant("green", "g"),
        ],
        enabled: true,
        disabled_variant: "control".into(),
        default_variant: "control".into(),
        rules: Vec::new(),
        prerequisites: Vec::new(),
        tags: Vec::new(),
        metadata: flagstream::model::Metadata::new(),
        stamp: Stamp::default(),
    }
}

fn split() -> Serve {
    Serve::Split(Split {
        variants: [("control", 334), ("blue", 333), ("green", 333)]
            .iter()
            .map(|(v, w)| WeightedVariant {
                variant: v.to_string(),
                weight: *w,
            })
            .collect(),
        stickiness: Stickiness::Default,
        group_id: None,
        overrides: Vec::new(),
    })
}

/// The flag of the `targeted` bench.
fn targeted(key: &str) -> Flag {
    let mut flag = base(key);
    flag.rules = vec![Rule {
        name: "eu adults".into(),
        constraints: vec![
            constraint(
                "country",
                Operator::In,
                &["de", "fr", "nl", "be", "at"],
                false,
            ),
            constraint("email", Operator::StrStartsWith, &["ANNA", "BOB"], true),
            constraint("age", Operator::NumGte, &["18"], false),
        ],
        segments: Vec::new(),
        rollout: Some(Rollout {
            percentage: 50,
            stickiness: Stickiness::Default,
            group_id: None,
        }),
        serve: split(),
    }];
    flag
}

/// The i-th flag of a mixed namespace: plain, targeted, rollouts, segments,
/// prerequisites, regexes and semvers.
fn mixed(i: usize) -> Flag {
    let key = format!("flag-{i:05}");
    match i % 6 {
        0 => base(&key),
        1 => targeted(&key),
        2 => {
            let mut f = base(&key);
            f.rules = vec![Rule {
                name: String::new(),
                constraints: vec![constraint("plan", Operator::In, &["pro", "team"], false)],
                segments: vec!["beta".into()],
                rollout: Some(Rollout {
                    percentage: 30,
                    stickiness: Stickiness::Default,
                    group_id: None,
                }),
                serve: Serve::Variant("blue".into()),
            }];
            f
        }
        3 => {
            let mut f = base(&key);
            f.prerequisites = vec![Prerequisite {
                flag: format!("flag-{:05}", i - 3),
                expect_off: false,
                variants: vec![],
            }];
            f.rules = vec![Rule {
                name: String::new(),
                constraints: vec![constraint(
                    "version",
                    Operator::SemverGte,
                    &["2.0.0"],
                    false,
                )],
                segments: Vec::new(),
                rollout: None,
                serve: Serve::Variant("green".into()),
            }];
            f
        }
        4 => {
            let mut f = base(&key);
            f.rules = vec![Rule {
                name: String::new(),
                constraints: vec![constraint(
                    "email",
                    Operator::Regex,
                    &["@example\\.com$"],
                    true,
                )],
                segments: Vec::new(),
                rollout: None,
                serve: split(),
            }];
            f
        }
        _ => {
            let mut f = base(&key);
            f.enabled = i % 12 != 5;
            f.rules = vec![Rule {
                name: String::new(),
                constraints: vec![constraint(
                    "userId",
                    Operator::In,
                    &[
                        "u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8", "u9", "u10", "u11", "u12",
                    ],
                    false,
                )],
                segments: Vec::new(),
                rollout: None,
                serve: Serve::Variant("blue".into()),
            }];
            f
        }
    }
}

fn segment() -> Segment {
    Segment {
        namespace: "bench".into(),
        key: "beta".into(),
        description: String::new(),
        constraints: vec![constraint("country", Operator::In, &["de", "fr"], false)],
        stamp: Stamp::default(),
    }
}

/// A context as the API receives it; `user` is chosen so that the targeted
/// flag's rollout lets it through (the whole path is measured).
fn context(user: &str) -> pb::Context {
    pb::Context {
        user_id: user.into(),
        session_id: "session-1".into(),
        app_name: "web".into(),
        properties: [
            ("country", "de"),
            ("email", "Anna@example.com"),
            ("age", "42"),
            ("plan", "pro"),
            ("version", "2.3.1"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
        ..pb::Context::default()
    }
}

/// The calling thread's on-CPU time in nanoseconds, as criterion values.
struct CpuTime;

fn on_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

impl Measurement for CpuTime {
    type Intermediate = u64;
    type Value = u64;
    fn start(&self) -> u64 {
        on_cpu_ns()
    }
    fn end(&self, start: u64) -> u64 {
        on_cpu_ns().saturating_sub(start)
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, value: &u64) -> f64 {
        *value as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        // Values are nanoseconds, formatted as wall-clock ones are.
        WallTime.formatter()
    }
}

fn wall(c: &mut Criterion) {
    benches(c, "");
}

fn cpu(c: &mut Criterion<CpuTime>) {
    benches(c, "cpu/");
}

fn benches<M: Measurement + 'static>(c: &mut Criterion<M>, prefix: &str) {
    let mut set = FlagSet::new();
    set.upsert_flag(targeted("targeted"));
    set.upsert_flag(base("plain"));
    let user = (0..)
        .map(|i| format!("user-{i}"))
        .find(|u| {
            set.evaluate("targeted", &convert::context(&context(u)))
                .is_on()
        })
        .unwrap();
    let ctx = context(&user);

    c.bench_function(&format!("{prefix}targeted"), |b| {
        b.iter(|| {
            let e = set.evaluate(black_box("targeted"), &convert::context(black_box(&ctx)));
            black_box(e.variant)
        })
    });
    c.bench_function(&format!("{prefix}plain"), |b| {
        b.iter(|| {
            let e = set.evaluate(black_box("plain"), &convert::context(black_box(&ctx)));
            black_box(e.variant)
        })
    });

    let mut all = FlagSet::new();
    all.upsert_segment(segment());
    for i in 0..1000 {
        all.upsert_flag(mixed(i));
    }
    c.bench_function(&format!("{prefix}all_1000"), |b| {
        b.iter(|| {
            let view = convert::context(black_box(&ctx));
            let mut on = 0usize;
            for flag in all.flags() {
                let e = all.evaluate_flag(flag, &view);
                on += usize::from(e.is_on());
                black_box(e.variant);
            }
            on
        })
    });

    let models: Vec<Flag> = (0..10_000).map(mixed).collect();
    let mut group = c.benchmark_group(format!("{prefix}compile"));
    group.sample_size(10);
    group.bench_function("compile_10000", |b| {
        b.iter_batched(
            || models.clone(),
            |models| {
                let mut set = FlagSet::new();
                set.upsert_segment(segment());
                for flag in models {
                    set.upsert_flag(flag);
                }
                set
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group! {
    name = engine;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = wall
}
criterion_group! {
    name = engine_cpu;
    // Few, long samples: the on-CPU clock may advance in coarse steps.
    config = Criterion::default()
        .with_measurement(CpuTime)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = cpu
}
criterion_main!(engine, engine_cpu);
