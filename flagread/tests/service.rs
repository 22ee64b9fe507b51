//! FlagEval served by `flagread::run_with` on 127.0.0.1:0, following a fake upstream: results and
//! errors, batches, `min_revision`, Watch, health, tokens, load shedding, the snapshot file and
//! shutdown.

mod support;

use std::time::Duration;

use flagread::Config;
use flagstream::pb;
use flagstream::pb::flag_eval_client::FlagEvalClient;
use support::*;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

/// A replica of `fake` whose first subscription got a snapshot at revision 5 of namespace
/// `prod` (flags `a`, `b`, a string flag `s`) and `dev` (flag `x`).
async fn serving(fake: &mut FakeUpstream, config: Config) -> (Replica, Subscription) {
    let replica = Replica::start(config).await;
    let subscription = fake.next().await;
    let mut s = flag("prod", "s", 4);
    s.flag_type = flagstream::model::FlagType::String;
    for variant in &mut s.variants {
        variant.value = flagstream::model::Value::String(variant.name.clone());
    }
    subscription
        .send(snapshot(
            5,
            vec![
                flag("prod", "a", 2),
                flag("prod", "b", 5),
                s,
                flag("dev", "x", 1),
            ],
        ))
        .await;
    eventually("the snapshot", || replica.handles.state.revision() == 5).await;
    (replica, subscription)
}

fn evaluate(ns: &str, key: &str) -> pb::EvaluateRequest {
    pb::EvaluateRequest {
        namespace: ns.into(),
        flag_key: key.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn evaluate_answers_and_refuses_as_documented() {
    let mut fake = FakeUpstream::start().await;
    let mut config = Config::local(fake.url.clone());
    config.flag_metrics_namespaces = vec!["prod".into()];
    let (replica, _sub) = serving(&mut fake, config).await;
    let mut client = replica.client().await;

    // Each case: a request and the variant served, or the status code and a part of its message.
    async fn check(
        client: &mut FlagEvalClient<Channel>,
        request: pb::EvaluateRequest,
        expected: Result<&str, (Code, &str)>,
    ) {
        let what = format!("{request:?}");
        match (client.evaluate(request).await, expected) {
            (Ok(response), Ok(variant)) => {
                let response = response.into_inner();
                assert_eq!(response.variant, variant, "{what}");
                assert_eq!(response.revision, 5, "{what}");
            }
            (Err(status), Err((code, message))) => {
                assert_eq!(status.code(), code, "{what}: {status:?}");
                assert!(
                    status.message().contains(message),
                    "{what}: {:?} lacks {message:?}",
                    status.message()
                );
            }
            (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
        }
    }
    check(&mut client, evaluate("prod", "a"), Ok("on")).await;
    check(
        &mut client,
        evaluate("prod", "nope"),
        Err((Code::NotFound, "flag \"nope\"")),
    )
    .await;
    check(
        &mut client,
        evaluate("staging", "a"),
        Err((Code::NotFound, "namespace \"staging\"")),
    )
    .await;
    let typed = |t: pb::FlagType| pb::EvaluateRequest {
        expected_type: t.into(),
        ..evaluate("prod", "a")
    };
    check(&mut client, typed(pb::FlagType::Boolean), Ok("on")).await;
    check(
        &mut client,
        typed(pb::FlagType::String),
        Err((Code::InvalidArgument, "is of type BOOLEAN, not STRING")),
    )
    .await;
    check(
        &mut client,
        pb::EvaluateRequest {
            expected_type: 99,
            ..evaluate("prod", "a")
        },
        Err((Code::InvalidArgument, "expected_type")),
    )
    .await;
    let with_context = |context: pb::Context| pb::EvaluateRequest {
        context: Some(context),
        ..evaluate("prod", "a")
    };
    let many = (0..65)
        .map(|i| (format!("k{i}"), "v".to_string()))
        .collect();
    check(
        &mut client,
        with_context(pb::Context {
            properties: many,
            ..Default::default()
        }),
        Err((
            Code::InvalidArgument,
            "context.properties: 65 properties, at most 64 allowed",
        )),
    )
    .await;
    let long = "x".repeat(4097);
    check(
        &mut client,
        with_context(pb::Context {
            user_id: long,
            ..Default::default()
        }),
        Err((Code::InvalidArgument, "context.user_id")),
    )
    .await;
    check(
        &mut client,
        with_context(pb::Context {
            user_id: "u1".into(),
            ..Default::default()
        }),
        Ok("on"),
    )
    .await;

    let response = client
        .evaluate(evaluate("prod", "a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.flag_key, "a");
    assert_eq!(response.flag_revision, 2);
    assert_eq!(response.r#type, i32::from(pb::FlagType::Boolean));
    assert_eq!(
        response.metadata.get("owner").map(String::as_str),
        Some("team-a")
    );
    assert_eq!(
        response.value,
        Some(pb::TypedValue {
            kind: Some(pb::typed_value::Kind::BoolValue(true))
        })
    );

    let metrics = scrape(replica.handles.metrics_listen).await;
    assert!(
        metrics.contains("flagread_flag_evaluations_total{namespace=\"prod\",flag=\"a\",variant=\"on\",reason=\"STATIC\"} 4"),
        "{metrics}"
    );
    assert!(metrics.contains("flagread_applied_revision 5"), "{metrics}");
    assert!(metrics.contains("flagread_connected 1"), "{metrics}");
    replica.stop().await;
}

#[tokio::test]
async fn batches_carry_per_flag_errors_and_all_is_ordered_by_key() {
    let mut fake = FakeUpstream::start().await;
    let mut config = Config::local(fake.url.clone());
    config.flag_metrics_namespaces = vec!["prod".into()];
    let (replica, _sub) = serving(&mut fake, config).await;
    let mut client = replica.client().await;
    let request = pb::EvaluateBatchRequest {
        namespace: "prod".into(),
        flag_keys: vec!["b".into(), "nope".into(), "a".into()],
        ..Default::default()
    };
    let batch = client.evaluate_batch(request).await.unwrap().into_inner();
    assert_eq!(batch.revision, 5);
    let keys: Vec<&str> = batch.results.iter().map(|r| r.flag_key.as_str()).collect();
    assert_eq!(keys, ["b", "nope", "a"]);
    assert_eq!(
        batch.results[1].error_code,
        i32::from(pb::ErrorCode::FlagNotFound)
    );
    assert_eq!(batch.results[1].reason, i32::from(pb::Reason::Error));
    assert_eq!(batch.results[0].variant, "on");

    let too_many = pb::EvaluateBatchRequest {
        namespace: "prod".into(),
        flag_keys: (0..1001).map(|i| format!("f{i}")).collect(),
        ..Default::default()
    };
    let status = client.evaluate_batch(too_many).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("flag_keys: 1001 keys asked for (limit 1000)"),
        "{status:?}"
    );

    let all = client
        .evaluate_all(pb::EvaluateAllRequest {
            namespace: "prod".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let keys: Vec<&str> = all.results.iter().map(|r| r.flag_key.as_str()).collect();
    assert_eq!(keys, ["a", "b", "s"]);
    // The batch paths encode results themselves: each must be what Evaluate answers.
    let context = pb::Context {
        user_id: "user-7".into(),
        ..Default::default()
    };
    let all = client
        .evaluate_all(pb::EvaluateAllRequest {
            namespace: "prod".into(),
            context: Some(context.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for result in &all.results {
        let single = client
            .evaluate(pb::EvaluateRequest {
                namespace: "prod".into(),
                flag_key: result.flag_key.clone(),
                context: Some(context.clone()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(*result, single);
    }
    // Batch evaluations are counted like single ones: `b` was evaluated by the batch, both
    // EvaluateAll calls and the Evaluate just above.
    let metrics = scrape(replica.handles.metrics_listen).await;
    let b_count: u64 = metrics
        .lines()
        .filter(|line| {
            line.starts_with("flagread_flag_evaluations_total{namespace=\"prod\",flag=\"b\"")
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(b_count, 4, "{metrics}");
    let status = client
        .evaluate_all(pb::EvaluateAllRequest {
            namespace: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    replica.stop().await;
}

/// Answers larger than the write-gathering wrapper holds (`--coalesce-writes`, on by default;
/// `flagstream::kit::coalesce`), many in flight on a few connections and mixed with small ones,
/// each arrive whole and equal to what a replica without the wrapper answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answers_arrive_whole_when_writes_are_gathered() {
    // On by default; `--coalesce-writes false` turns it off.
    assert!(Config::local("http://127.0.0.1:1").coalesce_writes);
    let off = <Config as clap::Parser>::try_parse_from([
        "flagread",
        "--dev-no-auth",
        "--coalesce-writes",
        "false",
    ])
    .expect("--coalesce-writes takes true or false");
    assert!(!off.coalesce_writes);

    let mut fake = FakeUpstream::start().await;
    // 3,000 flags: an EvaluateAll answer of about 120 KB, more than the 64 KiB gathered.
    let flags: Vec<_> = (0..3000)
        .map(|i| flag("big", &format!("flag-{i:04}"), 7))
        .collect();
    let mut replicas = Vec::new();
    for coalesce in [true, false] {
        let mut config = Config::local(fake.url.clone());
        config.coalesce_writes = coalesce;
        let replica = Replica::start(config).await;
        let subscription = fake.next().await;
        subscription.send(snapshot(7, flags.clone())).await;
        eventually("the snapshot", || replica.handles.state.revision() == 7).await;
        replicas.push((replica, subscription));
    }
    let all = pb::EvaluateAllRequest {
        namespace: "big".into(),
        context: Some(pb::Context {
            user_id: "user-7".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut plain = replicas[1].0.client().await;
    let expected = plain.evaluate_all(all.clone()).await.unwrap().into_inner();
    assert_eq!(expected.results.len(), 3000);
    let expected_one = plain
        .evaluate(evaluate("big", "flag-1234"))
        .await
        .unwrap()
        .into_inner();
    let expected = std::sync::Arc::new((expected, expected_one));

    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..3 {
        let client = replicas[0].0.client().await;
        for call in 0..48 {
            let (mut client, all, expected) = (client.clone(), all.clone(), expected.clone());
            calls.spawn(async move {
                if call % 3 == 0 {
                    let one = client.evaluate(evaluate("big", "flag-1234")).await;
                    assert_eq!(one.unwrap().into_inner(), expected.1);
                } else {
                    let answer = client.evaluate_all(all).await.unwrap().into_inner();
                    assert_eq!(answer.revision, expected.0.revision);
                    assert!(answer.results == expected.0.results, "call {call} differs");
                }
            });
        }
    }
    let answered = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(call) = calls.join_next().await {
            call.expect("every call answered whole");
        }
    });
    answered.await.expect("every call answered within 30 s");
    for (replica, _subscription) in replicas {
        replica.stop().await;
    }
}

#[tokio::test]
async fn min_revision_waits_for_the_write_or_fails_naming_the_revision_held() {
    let mut fake = FakeUpstream::start().await;
    let config = Config::local(fake.url.clone());
    let (replica, sub) = serving(&mut fake, config).await;
    let mut client = replica.client().await;

    // Already applied: answers at once.
    let now = pb::EvaluateRequest {
        min_revision: 5,
        ..evaluate("prod", "a")
    };
    assert_eq!(client.evaluate(now).await.unwrap().into_inner().revision, 5);

    // Not yet applied: waits, and answers from the new revision once it arrives.
    let mut waiting = client.clone();
    let pending = tokio::spawn(async move {
        let mut request = tonic::Request::new(pb::EvaluateRequest {
            min_revision: 6,
            ..evaluate("prod", "new")
        });
        request.set_timeout(Duration::from_secs(5));
        waiting.evaluate(request).await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!pending.is_finished(), "the call waits for revision 6");
    sub.send([put(6, vec![flag("prod", "new", 6)])]).await;
    let response = pending
        .await
        .unwrap()
        .expect("answered once revision 6 is applied")
        .into_inner();
    assert_eq!((response.revision, response.variant.as_str()), (6, "on"));

    // Never applied within the deadline: UNAVAILABLE naming the revision held, before the
    // deadline (not tonic's CANCELLED at it).
    let mut request = tonic::Request::new(pb::EvaluateRequest {
        min_revision: 9,
        ..evaluate("prod", "a")
    });
    request.set_timeout(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let status = client.evaluate(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status
            .message()
            .contains("revision 9 not applied yet: this replica has applied revision 6"),
        "{status:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(250));

    let mut batch = tonic::Request::new(pb::EvaluateBatchRequest {
        namespace: "prod".into(),
        flag_keys: vec!["a".into()],
        min_revision: 7,
        ..Default::default()
    });
    batch.set_timeout(Duration::from_millis(500));
    assert_eq!(
        client.evaluate_batch(batch).await.unwrap_err().code(),
        Code::Unavailable
    );
    replica.stop().await;
}

#[tokio::test]
async fn watch_reports_the_revision_then_each_change_with_results() {
    let mut fake = FakeUpstream::start().await;
    let config = Config::local(fake.url.clone());
    let (replica, sub) = serving(&mut fake, config).await;
    let mut client = replica.client().await;
    let request = pb::WatchRequest {
        namespace: "prod".into(),
        context: Some(pb::Context {
            user_id: "u1".into(),
            ..Default::default()
        }),
        flag_keys: vec![],
    };
    let mut events = client.watch(request).await.unwrap().into_inner();
    async fn next(events: &mut tonic::Streaming<pb::WatchEvent>) -> pb::WatchEvent {
        tokio::time::timeout(Duration::from_secs(5), events.message())
            .await
            .expect("an event")
            .unwrap()
            .unwrap()
    }
    // A second subscriber asks for flag `a` only, without a context.
    let only_a = pb::WatchRequest {
        namespace: "prod".into(),
        context: None,
        flag_keys: vec!["a".into()],
    };
    let mut only_a = client.watch(only_a).await.unwrap().into_inner();
    assert_eq!(next(&mut only_a).await.revision, 5);
    let first = next(&mut events).await;
    assert_eq!(
        (
            first.revision,
            first.changed_flags.len(),
            first.full_refresh
        ),
        (5, 0, false)
    );

    // A change in another namespace is not reported; the next one in `prod` is.
    sub.send([
        put(6, vec![flag("dev", "y", 6)]),
        put(7, vec![flag("prod", "c", 7)]),
        delete(8, "prod", "a"),
    ])
    .await;
    let event = next(&mut events).await;
    assert_eq!(
        (event.revision, event.changed_flags.clone()),
        (7, vec!["c".to_string()])
    );
    assert_eq!(event.results.len(), 1);
    assert_eq!(event.results[0].variant, "on");
    let event = next(&mut events).await;
    assert_eq!(
        (event.revision, event.changed_flags.clone()),
        (8, vec!["a".to_string()])
    );
    assert_eq!(
        event.results[0].error_code,
        i32::from(pb::ErrorCode::FlagNotFound)
    );

    let event = next(&mut only_a).await;
    assert_eq!(
        (event.revision, event.changed_flags.clone()),
        (8, vec!["a".to_string()])
    );
    assert!(event.results.is_empty(), "no context, no results");

    // A new snapshot asks the client to refresh everything.
    sub.send(snapshot(20, vec![flag("prod", "a", 20)])).await;
    let event = next(&mut events).await;
    assert!(event.full_refresh && event.revision == 20, "{event:?}");

    let status = client
        .watch(pb::WatchRequest {
            namespace: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    // An open Watch does not hold up shutdown.
    replica.stop().await;
    assert!(
        tokio::time::timeout(Duration::from_secs(5), events.message())
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn health_is_not_serving_until_a_full_state_is_held() {
    let mut fake = FakeUpstream::start().await;
    let replica = Replica::start(Config::local(fake.url.clone())).await;
    let sub = fake.next().await;
    assert_eq!(replica.health().await, ServingStatus::NotServing);
    let status = replica
        .client()
        .await
        .evaluate(evaluate("prod", "a"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    sub.send(snapshot(1, vec![flag("prod", "a", 1)])).await;
    eventually("the snapshot", || replica.handles.state.is_ready()).await;
    let mut serving = false;
    for _ in 0..100 {
        if replica.health().await == ServingStatus::Serving {
            serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(serving, "SERVING once the snapshot is applied");
    replica.stop().await;
}

#[tokio::test]
async fn eval_tokens_are_checked_and_limited_to_their_namespaces() {
    let dir = temp_dir("tokens");
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, "web eval:prod web-secret-0123456789\nall eval all-secret-01234567890\nrep sync rep-secret-01234567890\n").unwrap();
    let mut fake = FakeUpstream::start().await;
    let mut config = Config::local(fake.url.clone());
    config.dev_no_auth = false;
    config.tokens_file = Some(tokens);
    let (replica, _sub) = serving(&mut fake, config).await;
    let mut client = replica.client().await;

    async fn check(
        client: &mut FlagEvalClient<Channel>,
        token: Option<&str>,
        ns: &str,
        key: &str,
        expected: Code,
    ) {
        let mut request = tonic::Request::new(evaluate(ns, key));
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        let code = match client.evaluate(request).await {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        assert_eq!(code, expected, "token {token:?} on {ns}/{key}");
    }
    check(&mut client, None, "prod", "a", Code::Unauthenticated).await;
    check(
        &mut client,
        Some("wrong-secret-0123456789"),
        "prod",
        "a",
        Code::Unauthenticated,
    )
    .await;
    check(
        &mut client,
        Some("web-secret-0123456789"),
        "prod",
        "a",
        Code::Ok,
    )
    .await;
    check(
        &mut client,
        Some("web-secret-0123456789"),
        "dev",
        "x",
        Code::PermissionDenied,
    )
    .await;
    check(
        &mut client,
        Some("all-secret-01234567890"),
        "dev",
        "x",
        Code::Ok,
    )
    .await;
    check(
        &mut client,
        Some("rep-secret-01234567890"),
        "prod",
        "a",
        Code::PermissionDenied,
    )
    .await;
    // Health needs no token.
    assert_eq!(replica.health().await, ServingStatus::Serving);
    replica.stop().await;
}

/// A request for `ns`/`key` with `token`, waiting for `min_revision` within `timeout`.
fn waiting(
    token: &str,
    ns: &str,
    key: &str,
    min_revision: u64,
    timeout: Duration,
) -> tonic::Request<pb::EvaluateRequest> {
    let mut request = tonic::Request::new(pb::EvaluateRequest {
        min_revision,
        ..evaluate(ns, key)
    });
    request.set_timeout(timeout);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

const NOISY: &str = "noisy-secret-0123456789";
const WEB: &str = "web-secret-0123456789";

/// A config with tokens `noisy` (eval:dev, secret [`NOISY`]) and `web` (eval:prod, [`WEB`]).
fn with_tokens(fake: &FakeUpstream, name: &str) -> Config {
    let dir = temp_dir(name);
    let tokens = dir.join("tokens");
    std::fs::write(
        &tokens,
        format!("noisy eval:dev {NOISY}\nweb eval:prod {WEB}\n"),
    )
    .unwrap();
    let mut config = Config::local(fake.url.clone());
    config.dev_no_auth = false;
    config.tokens_file = Some(tokens);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unreachable_min_revision_calls_leaves_other_callers_served() {
    let mut fake = FakeUpstream::start().await;
    let mut config = with_tokens(&fake, "flood");
    config.concurrency_limit = 100;
    config.max_revision_waits_per_token = 200;
    config.revision_horizon_ms = 2_000;
    let (replica, sub) = serving(&mut fake, config).await;
    let client = replica.client().await;

    // A token limited to another namespace asks for a revision that will never come, 1,000
    // times at once: before, each call held a concurrency permit for up to 30 s.
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..1_000 {
        let mut client = client.clone();
        flood.spawn(async move {
            client
                .evaluate(waiting(
                    NOISY,
                    "dev",
                    "x",
                    1_000_000_000_000,
                    Duration::from_secs(30),
                ))
                .await
        });
    }
    eventually("the token's waits fill its bound", || {
        replica.handles.eval.revision_waits() == 200
    })
    .await;

    // Meanwhile another team's calls are answered, and its own min_revision waits work.
    let mut web = client.clone();
    for _ in 0..50 {
        web.evaluate(waiting(WEB, "prod", "a", 0, Duration::from_secs(5)))
            .await
            .expect("another namespace's caller is served during the flood");
    }
    let pending = tokio::spawn({
        let mut web = client.clone();
        async move {
            web.evaluate(waiting(WEB, "prod", "a", 6, Duration::from_secs(5)))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    sub.send([put(6, vec![flag("prod", "c", 6)])]).await;
    assert_eq!(pending.await.unwrap().unwrap().into_inner().revision, 6);

    // The flood is refused: beyond the token's bound at once, the rest when the horizon ends.
    let mut codes = std::collections::BTreeMap::new();
    while let Some(result) = flood.join_next().await {
        let status = result.unwrap().expect_err("revision 10^12 never comes");
        *codes.entry(format!("{:?}", status.code())).or_insert(0) += 1;
        if status.code() == Code::ResourceExhausted {
            assert!(
                status
                    .message()
                    .contains("token \"noisy\" holds its limit of 200 min_revision waits"),
                "{status:?}"
            );
        }
    }
    assert_eq!(
        codes,
        [
            ("OutOfRange".to_string(), 200),
            ("ResourceExhausted".to_string(), 800)
        ]
        .into(),
        "{codes:?}"
    );
    assert_eq!(
        replica.handles.eval.revision_waits(),
        0,
        "every wait gave its slot back"
    );
    let metrics = scrape(replica.handles.metrics_listen).await;
    assert!(
        metrics.contains("flagread_revision_waits_refused_total 800")
            && metrics.contains("flagread_revision_waits 0"),
        "{metrics}"
    );
    replica.stop().await;
}

#[tokio::test]
async fn min_revision_beyond_the_writers_head_waits_only_the_horizon() {
    let mut fake = FakeUpstream::start().await;
    let mut config = Config::local(fake.url.clone());
    config.revision_horizon_ms = 300;
    let (replica, sub) = serving(&mut fake, config).await;
    let mut client = replica.client().await;

    // A revision the writer has not announced: refused once the horizon ends, long before the
    // call's deadline.
    let started = std::time::Instant::now();
    let mut request = tonic::Request::new(pb::EvaluateRequest {
        min_revision: 1_000_000_000_000,
        ..evaluate("prod", "a")
    });
    request.set_timeout(Duration::from_secs(20));
    let status = client.evaluate(request).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().starts_with(
            "min_revision: revision 1000000000000 is beyond the writer's head revision 5"
        ),
        "{status:?}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
        "{waited:?}"
    );

    // A revision announced within the horizon (a client that just wrote it) is waited for until
    // it is applied, past the horizon.
    let pending = tokio::spawn({
        let mut client = client.clone();
        async move {
            let mut request = tonic::Request::new(pb::EvaluateRequest {
                min_revision: 7,
                ..evaluate("prod", "a")
            });
            request.set_timeout(Duration::from_secs(10));
            client.evaluate(request).await
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    sub.send([heartbeat(7)]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !pending.is_finished(),
        "revision 7 is announced, not applied"
    );
    sub.send([
        put(6, vec![flag("prod", "c", 6)]),
        put(7, vec![flag("prod", "d", 7)]),
    ])
    .await;
    assert_eq!(pending.await.unwrap().unwrap().into_inner().revision, 7);
    replica.stop().await;
}

#[tokio::test]
async fn watch_streams_and_their_keys_are_bounded() {
    let mut fake = FakeUpstream::start().await;
    let mut config = with_tokens(&fake, "watch-bounds");
    config.max_watch_streams_per_token = 2;
    config.max_watch_streams = 3;
    let (replica, _sub) = serving(&mut fake, config).await;
    let mut client = replica.client().await;
    let watch = |token: &str, ns: &str, keys: usize| {
        let mut request = tonic::Request::new(pb::WatchRequest {
            namespace: ns.into(),
            context: None,
            flag_keys: (0..keys).map(|i| format!("flag-{i}")).collect(),
        });
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        request
    };

    // Too many keys: refused before anything is held.
    let status = client.watch(watch(NOISY, "dev", 1_001)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .contains("flag_keys: 1001 keys asked for (limit 1000)"),
        "{status:?}"
    );
    assert_eq!(replica.handles.eval.watch_streams(), 0);

    // Two streams per token, three in all.
    let first = client.watch(watch(NOISY, "dev", 1_000)).await.unwrap();
    let _second = client.watch(watch(NOISY, "dev", 0)).await.unwrap();
    let status = client.watch(watch(NOISY, "dev", 0)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains("token \"noisy\" holds its limit of 2 Watch streams"),
        "{status:?}"
    );
    let _web = client.watch(watch(WEB, "prod", 0)).await.unwrap();
    let status = client.watch(watch(WEB, "prod", 0)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains("this replica holds its limit of 3 Watch streams"),
        "{status:?}"
    );

    // A stream the client drops gives its slot back.
    drop(first);
    eventually("the dropped stream's slot is free", || {
        replica.handles.eval.watch_streams() == 2
    })
    .await;
    client.watch(watch(NOISY, "dev", 0)).await.unwrap();
    replica.stop().await;
}

#[tokio::test]
async fn a_replica_starts_from_its_snapshot_file_while_the_writer_is_away() {
    let dir = temp_dir("snapshot");
    let file = dir.join("state.pb");
    let mut fake = FakeUpstream::start().await;
    let mut config = Config::local(fake.url.clone());
    config.snapshot_file = Some(file.clone());
    config.snapshot_interval_ms = 10;
    let (replica, sub) = serving(&mut fake, config.clone()).await;
    sub.send([put(6, vec![flag("prod", "late", 6)])]).await;
    eventually("the change", || replica.handles.state.revision() == 6).await;
    replica.stop().await;
    drop(sub);
    drop(fake);

    // The writer is gone; the replica serves what the file holds and says it is SERVING.
    config.upstream = "http://127.0.0.1:9".into();
    let replica = Replica::start(config).await;
    assert_eq!(replica.health().await, ServingStatus::Serving);
    let response = replica
        .client()
        .await
        .evaluate(evaluate("prod", "late"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((response.revision, response.variant.as_str()), (6, "on"));
    assert!(!replica.handles.status.connected());
    replica.stop().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_snapshot_file_serves_only_the_history_and_namespaces_it_covers() {
    let dir = temp_dir("snapshot-covers");
    let file = dir.join("state.pb");
    let mut fake = FakeUpstream::start().await;
    let mut config = Config::local(fake.url.clone());
    config.namespaces = vec!["prod".into()];
    config.snapshot_file = Some(file.clone());
    config.snapshot_interval_ms = 10;
    let (replica, sub) = serving(&mut fake, config.clone()).await;
    eventually("the snapshot file", || file.exists()).await;
    replica.stop().await;
    drop(sub);
    drop(fake);
    config.upstream = "http://127.0.0.1:9".into();

    // Made under `--namespaces prod`, it must not become the whole state of a replica serving
    // prod and dev: that replica waits for the writer instead.
    let mut wider = config.clone();
    wider.namespaces = vec!["prod".into(), "dev".into()];
    let replica = Replica::start(wider).await;
    assert_eq!(replica.health().await, ServingStatus::NotServing);
    replica.stop().await;

    // The same namespaces (or fewer) may use it, with the history it recorded.
    let replica = Replica::start(config.clone()).await;
    assert_eq!(replica.health().await, ServingStatus::Serving);
    let held = replica.handles.state.load();
    assert_eq!(held.history.id, support::HISTORY);
    assert_eq!(held.history.chain, support::chain(5));
    replica.stop().await;

    // An unreadable file is passed over: the replica starts and syncs from the writer.
    std::fs::write(&file, b"not a snapshot").unwrap();
    let replica = Replica::start(config).await;
    assert_eq!(replica.health().await, ServingStatus::NotServing);
    replica.stop().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_resubscription_presents_the_history_position_held() {
    let mut fake = FakeUpstream::start().await;
    let config = Config::local(fake.url.clone());
    let (replica, sub) = serving(&mut fake, config).await;
    sub.send([put(6, vec![flag("prod", "late", 6)])]).await;
    eventually("the change", || replica.handles.state.revision() == 6).await;
    drop(sub);
    let again = fake.next().await;
    assert_eq!(again.request.from_revision, 6);
    assert_eq!(again.request.chain, support::chain(6));
    replica.stop().await;
}

#[tokio::test]
async fn a_change_the_replica_cannot_apply_is_reported_loudly_and_clears_when_applied() {
    let mut fake = FakeUpstream::start().await;
    let config = Config::local(fake.url.clone());
    let (replica, sub) = serving(&mut fake, config).await;
    assert_eq!(
        replica.health_of(flagread::SYNC_HEALTH).await,
        ServingStatus::Serving
    );
    // A flag this replica cannot convert (no such flag type) as revision 6.
    let mut bad = pb::Flag::from(flag("prod", "bad", 6));
    bad.r#type = 99;
    sub.send([message(pb::sync_message::Kind::Change(pb::Change {
        revision: 6,
        deltas: vec![pb::Delta {
            kind: Some(pb::delta::Kind::PutFlag(bad)),
        }],
        chain: chain(6),
        time: None,
    }))])
    .await;
    eventually("the stuck revision", || replica.handles.status.stuck() == 6).await;
    // It still serves revision 5, and says which revision it cannot apply.
    assert_eq!(replica.health().await, ServingStatus::Serving);
    assert_eq!(
        replica.health_of(flagread::SYNC_HEALTH).await,
        ServingStatus::NotServing
    );
    assert_eq!(replica.handles.state.revision(), 5);
    let metrics = scrape(replica.handles.metrics_listen).await;
    assert!(metrics.contains("flagread_stuck_revision 6"), "{metrics}");

    // Once the writer sends something it can apply, the report clears.
    let again = fake.next().await;
    assert_eq!(again.request.from_revision, 5);
    again.send([put(6, vec![flag("prod", "good", 6)])]).await;
    eventually("the change", || replica.handles.state.revision() == 6).await;
    eventually("the report cleared", || replica.handles.status.stuck() == 0).await;
    assert_eq!(
        replica.health_of(flagread::SYNC_HEALTH).await,
        ServingStatus::Serving
    );
    replica.stop().await;
}

/// The text of `GET /metrics`.
async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    socket.read_to_string(&mut text).await.unwrap();
    text
}

#[tokio::test]
async fn shutdown_ends_min_revision_waits_at_once() {
    let mut fake = FakeUpstream::start().await;
    let config = Config::local(fake.url.clone());
    let (replica, _sub) = serving(&mut fake, config).await;
    let mut waiting = replica.client().await;
    let pending = tokio::spawn(async move {
        let mut request = tonic::Request::new(pb::EvaluateRequest {
            min_revision: 99,
            ..evaluate("prod", "a")
        });
        request.set_timeout(Duration::from_secs(20));
        let started = std::time::Instant::now();
        (waiting.evaluate(request).await, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    replica.stop().await;
    let (result, waited) = pending.await.unwrap();
    assert_eq!(result.unwrap_err().code(), Code::Unavailable);
    assert!(
        waited < Duration::from_secs(2),
        "the wait ended with the shutdown, not the deadline: {waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn evaluations_are_answered_while_a_large_change_is_applied() {
    // One async worker: were the change decoded, converted or compiled on it, no call could be
    // answered until it was applied.
    let mut fake = FakeUpstream::start().await;
    let config = Config::local(fake.url.clone());
    let (replica, sub) = serving(&mut fake, config).await;
    let mut client = replica.client().await;
    let import: Vec<_> = (0..20_000)
        .map(|i| flag("bulk", &format!("imported-{i}"), 6))
        .collect();
    sub.send([put(6, import)]).await;
    // Received (the replica has heard of revision 6) but not applied yet.
    eventually("the change is received", || {
        replica.handles.status.head() == 6
    })
    .await;
    let mut answered_meanwhile = 0;
    while replica.handles.state.revision() == 5 {
        let response = client.evaluate(evaluate("prod", "a")).await.unwrap();
        if response.into_inner().revision == 5 && replica.handles.state.revision() == 5 {
            answered_meanwhile += 1;
        }
    }
    assert!(
        answered_meanwhile > 0,
        "no evaluation was answered while the change was applied"
    );
    let flags = replica.handles.state.load().flag_count();
    assert_eq!(flags, 4 + 20_000);
    replica.stop().await;
}
