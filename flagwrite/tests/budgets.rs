//! Budgets a caller's write cannot exceed, against a real server on
//! 127.0.0.1:0: compiled regex memory per value, per flag and per namespace
//! (refused quickly, naming the field), and FlagAdmin reads that stay prompt
//! while the writer or an import does heavy work.

mod common;

use std::time::{Duration, Instant};

use common::*;
use flagstream::pb;
use flagstream::validate::{MAX_NAMESPACE_REGEX_BYTES, MAX_OBJECT_REGEX_BYTES};
use tonic::Code;

/// A rule serving `on` when `email` matches one of `patterns`.
fn regex_rule(patterns: impl IntoIterator<Item = String>) -> pb::Rule {
    pb::Rule {
        name: "regexes".into(),
        constraints: vec![pb::Constraint {
            attribute: "email".into(),
            operator: pb::Operator::Regex as i32,
            values: patterns.into_iter().collect(),
            inverted: false,
            case_insensitive: false,
        }],
        serve: Some(pb::Serve {
            kind: Some(pb::serve::Kind::Variant("on".into())),
        }),
        ..Default::default()
    }
}

/// A flag whose rules match `email` against `patterns`, 100 to a rule.
fn regex_flag(namespace: &str, key: &str, patterns: impl IntoIterator<Item = String>) -> pb::Flag {
    let mut flag = flag(namespace, key);
    let patterns: Vec<String> = patterns.into_iter().collect();
    for chunk in patterns.chunks(100) {
        flag.rules.push(regex_rule(chunk.to_vec()));
    }
    flag
}

/// Creates `flag` (or only validates it) and returns the refusal: its code and
/// message, and how long the writer took to answer. At most 20 seconds are
/// waited for, so a server that compiles everything fails the test rather than
/// hanging it.
async fn refusal(admin: &mut Admin, flag: pb::Flag, validate_only: bool) -> (String, Duration) {
    let started = Instant::now();
    let call = admin.create_flag(pb::CreateFlagRequest {
        flag: Some(flag),
        options: Some(pb::WriteOptions {
            validate_only,
            comment: String::new(),
        }),
    });
    let answer = tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .expect("the write was not answered within 20 s");
    let status = answer.expect_err("the write was accepted");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    (status.message().to_string(), started.elapsed())
}

/// One request of 2,000 distinct regexes (each a Unicode class repeated, some
/// hundreds of KiB compiled) used to be accepted after compiling all of them,
/// blocking the writer for seconds and growing every replica by gigabytes. It
/// is refused at the first value over a limit, naming it.
#[tokio::test]
async fn a_request_of_heavy_regexes_is_refused_quickly_naming_the_value() {
    let server = Server::start().await;
    let mut admin = server.admin(Some(ADMIN)).await;
    create_namespace(&mut admin, "bomb").await;

    // Each pattern compiles to about 560 KiB: over the limit per regex.
    let heavy = (0..2000).map(|i| format!(r"\w{{10}}[a-z]{{20}}x{i}"));
    let bomb = regex_flag("bomb", "heavy", heavy);
    assert!(prost::Message::encoded_len(&bomb) < flagstream::validate::MAX_REQUEST_BYTES);
    for validate_only in [true, false] {
        let (message, took) = refusal(&mut admin, bomb.clone(), validate_only).await;
        assert!(
            message.starts_with("flag.rules[0].constraints[0].values[0]: regex compiles to more than the 256 KiB limit"),
            "{message}"
        );
        assert!(took < Duration::from_secs(2), "refused after {took:?}");
    }

    // Each pattern compiles to about 170 KiB: under the limit per regex, but
    // a few of them exhaust the budget per flag.
    let medium = (0..2000).map(|i| format!(r"\w{{3}}y{i}"));
    let (message, took) = refusal(&mut admin, regex_flag("bomb", "medium", medium), false).await;
    let at = message
        .strip_prefix("flag.rules[0].constraints[0].values[")
        .and_then(|rest| rest.split_once(']'))
        .and_then(|(index, _)| index.parse::<usize>().ok())
        .unwrap_or_else(|| panic!("the message names no value: {message}"));
    assert!((5..10).contains(&at), "refused at values[{at}]: {message}");
    assert!(
        message.contains("of compiled regexes, over the 1 MiB budget per flag"),
        "{message}"
    );
    assert!(took < Duration::from_secs(2), "refused after {took:?}");

    // Identical patterns are compiled and counted once.
    let repeated = (0..2000).map(|_| r"\w{3}@example\.com".to_string());
    create_flag(&mut admin, regex_flag("bomb", "repeated", repeated)).await;
}

/// The flags and segments of one namespace share a budget: once it is spent,
/// the next flag with regexes is refused naming the namespace, other
/// namespaces are not affected, deleting gives the budget back, and a
/// restarted writer counts the namespace again from the store.
#[tokio::test]
async fn a_namespace_has_a_regex_budget() {
    let server = Server::start().await;
    let mut admin = server.admin(Some(ADMIN)).await;
    create_namespace(&mut admin, "full").await;
    create_namespace(&mut admin, "other").await;

    // About 700 KiB per flag: distinct patterns of about 170 KiB each, under
    // the budget per flag.
    let patterns = |flag: usize| (0..4).map(move |i| format!(r"\w{{3}}f{flag}p{i}"));
    let per_flag = MAX_OBJECT_REGEX_BYTES * 2 / 3;
    let fit = MAX_NAMESPACE_REGEX_BYTES / per_flag;
    let mut created = 0;
    let message = loop {
        assert!(created <= fit + 5, "{created} flags created, none refused");
        let flag = regex_flag("full", &format!("f{created}"), patterns(created));
        let answer = admin
            .create_flag(pb::CreateFlagRequest {
                flag: Some(flag),
                options: options("fill"),
            })
            .await;
        match answer {
            Ok(_) => created += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
                break status.message().to_string();
            }
        }
    };
    assert!(
        created > fit / 2,
        "refused after {created} flags: {message}"
    );
    assert!(
        message.starts_with("flag.rules[0].constraints[0].values[")
            && message.contains(r#"namespace "full" uses"#)
            && message.ends_with("over the 32 MiB budget per namespace"),
        "{message}"
    );

    // A segment counts too.
    let mut segment = segment("full", "regex-users");
    segment.constraints[0].operator = pb::Operator::Regex as i32;
    segment.constraints[0].values = patterns(1000).collect();
    let status = admin
        .create_segment(pb::CreateSegmentRequest {
            segment: Some(segment.clone()),
            options: options("one more"),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .starts_with("segment.constraints[0].values["),
        "{status:?}"
    );

    // Another namespace has its own budget.
    create_flag(&mut admin, regex_flag("other", "f", patterns(0))).await;

    // Deleting a flag gives its share back.
    admin
        .delete_flag(pb::DeleteFlagRequest {
            namespace: "full".into(),
            key: "f0".into(),
            expected_revision: 0,
            options: options("make room"),
        })
        .await
        .unwrap();
    create_flag(&mut admin, regex_flag("full", "after-delete", patterns(0))).await;

    // A restarted writer counts what the store holds.
    drop(admin);
    let dir = server.stop_keeping_data().await;
    let server = Server::start_in(dir, |_| {}).await;
    let mut admin = server.admin(Some(ADMIN)).await;
    let (message, _) = refusal(
        &mut admin,
        regex_flag("full", "again", patterns(2000)),
        true,
    )
    .await;
    assert!(message.contains(r#"namespace "full" uses"#), "{message}");
}

/// FlagAdmin reads answer promptly while an import is decoded and validated:
/// with one runtime worker, anything heavy done on it would hold every other
/// call (the test's client included) until it finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn reads_answer_while_a_heavy_dry_run_is_in_progress() {
    let server = Server::start().await;
    let mut admin = server.admin(Some(ADMIN)).await;
    create_namespace(&mut admin, "busy").await;
    create_flag(&mut admin, flag("busy", "probe")).await;

    // An Unleash export just under the request limit: thousands of features
    // whose constraints take a while to parse, convert and validate.
    let feature = |i: usize| {
        let values: Vec<String> = (0..40).map(|v| format!("\"user-{i}-{v}\"")).collect();
        format!(
            r#"{{"name":"f{i}","enabled":true,"strategies":[{{"name":"default","constraints":[{{"contextName":"userId","operator":"IN","values":[{}]}}]}}]}}"#,
            values.join(",")
        )
    };
    let mut features = Vec::new();
    let mut size = 0;
    while size < flagstream::validate::MAX_REQUEST_BYTES - 64 * 1024 {
        let f = feature(features.len());
        size += f.len() + 1;
        features.push(f);
    }
    let json = format!(r#"{{"version":2,"features":[{}]}}"#, features.join(","));

    let mut importer = admin.clone();
    let import = tokio::spawn(async move {
        let started = Instant::now();
        importer
            .import_namespace(pb::ImportNamespaceRequest {
                namespace: "busy".into(),
                source: Some(pb::import_namespace_request::Source::UnleashJson(json)),
                options: Some(pb::WriteOptions {
                    validate_only: true,
                    comment: String::new(),
                }),
            })
            .await
            .unwrap();
        started.elapsed()
    });

    // Reads while the import is in flight. The longest gap between two
    // answers counts, not only the read's own time: a worker held by the
    // import also holds this task while it sleeps between reads.
    let mut slowest = Duration::ZERO;
    let mut reads = 0;
    let mut last = Instant::now();
    while !import.is_finished() {
        admin
            .get_flag(pb::GetFlagRequest {
                namespace: "busy".into(),
                key: "probe".into(),
            })
            .await
            .unwrap();
        slowest = slowest.max(last.elapsed());
        last = Instant::now();
        reads += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let import_took = import.await.unwrap();
    assert!(
        reads >= 3,
        "only {reads} reads during a {import_took:?} import"
    );
    assert!(
        slowest < Duration::from_millis(250),
        "{slowest:?} between two reads while a {import_took:?} dry run was in progress"
    );
}
