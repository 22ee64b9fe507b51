//! flagd's evaluation protocol served by `flagread::run_with` on 127.0.0.1:0, following a fake
//! upstream: every resolver's values, variants, reasons and metadata, the status codes the flagd
//! providers map to OpenFeature's errors, the selector, tokens and anonymous namespaces,
//! read-your-writes, v1's `ResolveAll`, and the event stream (ready, changes with their
//! dependents, keep-alive, shutdown).

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use flagread::Config;
use flagstream::model::{self, Value};
use flagstream::pb::flagd::{v1, v2};
use prost_types::value::Kind;
use support::*;
use tonic::Code;
use tonic::transport::Channel;

type Client = v2::service_client::ServiceClient<Channel>;

/// Request headers: (name, value).
type Headers<'a> = [(&'static str, &'a str)];

/// Namespace `prod`: a flag of every type and reason. `dev` holds one flag.
fn flags() -> Vec<model::Flag> {
    let mut flags = reason_flags("prod");
    flags.extend([
        typed(
            "prod",
            "text",
            [Value::String(String::new()), Value::String("x".into())],
        ),
        typed("prod", "whole", [Value::Number(0.0), Value::Number(3.0)]),
        typed("prod", "half", [Value::Number(1.5), Value::Number(2.0)]),
        typed(
            "prod",
            "huge",
            [Value::Number(9_007_199_254_740_992.0), Value::Number(0.0)],
        ),
        typed(
            "prod",
            "object",
            [
                Value::Json(serde_json::json!({"color": "blue", "sizes": [1, 2]})),
                Value::Json(serde_json::json!({})),
            ],
        ),
        typed(
            "prod",
            "list",
            [
                Value::Json(serde_json::json!([1, 2])),
                Value::Json(serde_json::json!({})),
            ],
        ),
        flag("dev", "x", 1),
    ]);
    flags
}

/// A replica of `fake` (default namespace `prod`, its configuration then changed by `adjust`) at
/// revision 5 holding [`flags`].
async fn serving(
    fake: &mut FakeUpstream,
    adjust: impl FnOnce(&mut Config),
) -> (Replica, Subscription) {
    let mut config = Config::local(fake.url.clone());
    config.flagd_default_namespace = "prod".into();
    adjust(&mut config);
    let replica = Replica::start(config).await;
    let subscription = fake.next().await;
    subscription.send(snapshot(5, flags())).await;
    eventually("the snapshot", || replica.handles.state.revision() == 5).await;
    (replica, subscription)
}

async fn client(replica: &Replica) -> Client {
    Client::connect(replica.url.clone()).await.unwrap()
}

/// A request with `headers`.
fn with<T>(message: T, headers: &[(&'static str, &str)]) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    for (name, value) in headers {
        request.metadata_mut().insert(*name, value.parse().unwrap());
    }
    request
}

/// A context Struct from JSON.
fn context(json: serde_json::Value) -> Option<prost_types::Struct> {
    let serde_json::Value::Object(map) = json else {
        panic!("a context is an object")
    };
    Some(prost_types::Struct {
        fields: map
            .iter()
            .map(|(k, v)| (k.clone(), flagstream::convert::json_ref_to_pb(v)))
            .collect(),
    })
}

fn strings(metadata: &Option<prost_types::Struct>) -> BTreeMap<String, String> {
    metadata
        .as_ref()
        .unwrap()
        .fields
        .iter()
        .map(|(k, v)| {
            let text = match &v.kind {
                Some(Kind::StringValue(s)) => s.clone(),
                Some(Kind::NumberValue(n)) => n.to_string(),
                other => format!("{other:?}"),
            };
            (k.clone(), text)
        })
        .collect()
}

async fn boolean(
    client: &mut Client,
    key: &str,
    ctx: serde_json::Value,
    headers: &[(&'static str, &str)],
) -> Result<v2::ResolveBooleanResponse, tonic::Status> {
    let request = v2::ResolveBooleanRequest {
        flag_key: key.into(),
        context: context(ctx),
    };
    client
        .resolve_boolean(with(request, headers))
        .await
        .map(|r| r.into_inner())
}

/// Boolean resolutions: (key, context, value, variant, reason).
#[tokio::test]
async fn booleans_resolve_with_openfeature_reasons_and_explicit_values() {
    let mut fake = FakeUpstream::start().await;
    let (replica, _sub) = serving(&mut fake, |_| {}).await;
    let mut client = client(&replica).await;
    let cases = [
        ("on", serde_json::json!({}), true, "on", "STATIC"),
        ("off", serde_json::json!({}), false, "off", "DISABLED"),
        ("targeted", serde_json::json!({}), false, "off", "DEFAULT"),
        (
            "targeted",
            serde_json::json!({"plan": "pro", "targetingKey": null}),
            true,
            "on",
            "TARGETING_MATCH",
        ),
        // A failed prerequisite serves the disabled variant.
        ("child", serde_json::json!({}), false, "off", "DISABLED"),
        // No rules, but a prerequisite: the result depends on the parent, so never STATIC.
        ("guarded", serde_json::json!({}), true, "on", "DEFAULT"),
    ];
    for (key, ctx, value, variant, reason) in cases {
        let what = format!("{key} {ctx}");
        let r = boolean(&mut client, key, ctx, &[]).await.expect(&what);
        assert_eq!(r.value, Some(value), "{what}");
        assert_eq!(r.variant.as_deref(), Some(variant), "{what}");
        assert_eq!(r.reason, reason, "{what}");
    }
    let r = boolean(&mut client, "on", serde_json::json!({}), &[])
        .await
        .unwrap();
    assert_eq!(
        strings(&r.metadata),
        [
            ("flagSetId", "prod"),
            ("owner", "team-a"),
            ("revision", "5")
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .into_iter()
        .collect()
    );
    replica.stop().await;
}

#[tokio::test]
async fn every_type_resolves_and_a_value_of_another_type_is_refused() {
    let mut fake = FakeUpstream::start().await;
    let (replica, _sub) = serving(&mut fake, |_| {}).await;
    let mut client = client(&replica).await;
    let ctx = || context(serde_json::json!({}));

    let s = client
        .resolve_string(v2::ResolveStringRequest {
            flag_key: "text".into(),
            context: ctx(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (s.value.as_deref(), s.variant.as_deref(), &*s.reason),
        (Some(""), Some("a"), "STATIC")
    );
    let f = client
        .resolve_float(v2::ResolveFloatRequest {
            flag_key: "half".into(),
            context: ctx(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f.value, Some(1.5));
    let i = client
        .resolve_int(v2::ResolveIntRequest {
            flag_key: "whole".into(),
            context: ctx(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((i.value, i.variant.as_deref()), (Some(0), Some("a")));
    let o = client
        .resolve_object(v2::ResolveObjectRequest {
            flag_key: "object".into(),
            context: ctx(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        o.value,
        context(serde_json::json!({"color": "blue", "sizes": [1, 2]}))
    );

    // Refusals: (what, status, part of the message).
    let refusals = [
        (
            client
                .resolve_int(v2::ResolveIntRequest {
                    flag_key: "half".into(),
                    context: ctx(),
                })
                .await
                .map(drop),
            Code::InvalidArgument,
            "served 1.5, which is not a whole number",
        ),
        (
            client
                .resolve_int(v2::ResolveIntRequest {
                    flag_key: "huge".into(),
                    context: ctx(),
                })
                .await
                .map(drop),
            Code::InvalidArgument,
            "not a whole number within",
        ),
        (
            client
                .resolve_object(v2::ResolveObjectRequest {
                    flag_key: "list".into(),
                    context: ctx(),
                })
                .await
                .map(drop),
            Code::InvalidArgument,
            "served a JSON array, not an object",
        ),
        (
            client
                .resolve_string(v2::ResolveStringRequest {
                    flag_key: "on".into(),
                    context: ctx(),
                })
                .await
                .map(drop),
            Code::InvalidArgument,
            "is of type BOOLEAN, not STRING",
        ),
        (
            client
                .resolve_float(v2::ResolveFloatRequest {
                    flag_key: "missing".into(),
                    context: ctx(),
                })
                .await
                .map(drop),
            Code::NotFound,
            "flag \"missing\" not found in namespace \"prod\"",
        ),
        (
            boolean(&mut client, "bad", serde_json::json!({"plan": "pro"}), &[])
                .await
                .map(drop),
            Code::Internal,
            "could not be evaluated",
        ),
        (
            boolean(
                &mut client,
                "on",
                serde_json::json!({"targetingKey": 7}),
                &[],
            )
            .await
            .map(drop),
            Code::InvalidArgument,
            "context.\"targetingKey\": must be a string",
        ),
    ];
    for (result, code, message) in refusals {
        let status = result.expect_err(message);
        assert_eq!(status.code(), code, "{message}: {status:?}");
        assert!(status.message().contains(message), "{status:?}");
    }
    replica.stop().await;
}

#[tokio::test]
async fn the_selector_names_the_namespace() {
    let mut fake = FakeUpstream::start().await;
    let (replica, _sub) = serving(&mut fake, |_| {}).await;
    let mut client = client(&replica).await;
    let ctx = serde_json::json!({});
    // No selector: the default namespace.
    assert!(boolean(&mut client, "on", ctx.clone(), &[]).await.is_ok());
    for selector in ["flagSetId=dev", "dev"] {
        let r = boolean(
            &mut client,
            "x",
            ctx.clone(),
            &[("flagd-selector", selector)],
        )
        .await
        .unwrap();
        assert_eq!(strings(&r.metadata)["flagSetId"], "dev");
    }
    let missing = boolean(&mut client, "on", ctx.clone(), &[("flagd-selector", "dev")])
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let unknown_ns = boolean(
        &mut client,
        "on",
        ctx.clone(),
        &[("flagd-selector", "nope")],
    )
    .await
    .unwrap_err();
    assert_eq!(unknown_ns.code(), Code::NotFound);
    let bad = boolean(&mut client, "on", ctx, &[("flagd-selector", "source=x")])
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    assert!(bad.message().contains("unknown selector key"), "{bad:?}");
    replica.stop().await;
}

#[tokio::test]
async fn tokens_are_optional_only_for_anonymous_namespaces() {
    let dir = temp_dir("flagd-tokens");
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, "web eval:prod web-secret-0123456789\n").unwrap();
    let mut fake = FakeUpstream::start().await;
    let (replica, _sub) = serving(&mut fake, |config| {
        config.dev_no_auth = false;
        config.tokens_file = Some(tokens);
        config.anonymous_namespaces = vec!["dev".into()];
    })
    .await;
    let mut client = client(&replica).await;
    let ctx = serde_json::json!({});
    let dev = [("flagd-selector", "dev")];
    let cases: [(&str, &Headers, Code); 6] = [
        ("x", &dev, Code::Ok),
        ("on", &[], Code::Unauthenticated),
        (
            "on",
            &[("authorization", "Bearer web-secret-0123456789")],
            Code::Ok,
        ),
        (
            "x",
            &[
                ("flagd-selector", "dev"),
                ("authorization", "Bearer web-secret-0123456789"),
            ],
            Code::PermissionDenied,
        ),
        (
            "x",
            &[
                ("flagd-selector", "dev"),
                ("authorization", "Bearer wrong-secret-000000"),
            ],
            Code::Unauthenticated,
        ),
        (
            "on",
            &[("authorization", "Basic abc")],
            Code::Unauthenticated,
        ),
    ];
    for (key, headers, code) in cases {
        let got = boolean(&mut client, key, ctx.clone(), headers)
            .await
            .err()
            .map_or(Code::Ok, |s| s.code());
        assert_eq!(got, code, "{key} {headers:?}");
    }
    replica.stop().await;
}

#[tokio::test]
async fn min_revision_in_the_context_or_a_header_reads_your_writes() {
    let mut fake = FakeUpstream::start().await;
    let (replica, sub) = serving(&mut fake, |_| {}).await;
    let mut client = client(&replica).await;
    let mut later = flag("prod", "on", 6);
    later.enabled = false;
    let write = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        sub.send([heartbeat(6), put(6, vec![later])]).await;
    };
    let (read, ()) = tokio::join!(
        boolean(
            &mut client,
            "on",
            serde_json::json!({"minRevision": 6}),
            &[]
        ),
        write
    );
    assert_eq!(read.unwrap().reason, "DISABLED");
    let header = boolean(
        &mut client,
        "on",
        serde_json::json!({}),
        &[("flagstream-min-revision", "6")],
    )
    .await
    .unwrap();
    assert_eq!(strings(&header.metadata)["revision"], "6");
    replica.stop().await;
}

#[tokio::test]
async fn v1_resolves_one_flag_and_all_flags_of_the_namespace() {
    let mut fake = FakeUpstream::start().await;
    let (replica, _sub) = serving(&mut fake, |_| {}).await;
    let mut client = v1::service_client::ServiceClient::connect(replica.url.clone())
        .await
        .unwrap();
    let one = client
        .resolve_boolean(v1::ResolveBooleanRequest {
            flag_key: "off".into(),
            context: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (one.value, &*one.variant, &*one.reason),
        (false, "off", "DISABLED")
    );
    let all = client
        .resolve_all(v1::ResolveAllRequest {
            context: context(serde_json::json!({"plan": "pro"})),
        })
        .await
        .unwrap()
        .into_inner();
    let mut keys: Vec<&str> = all.flags.keys().map(String::as_str).collect();
    keys.sort();
    // `bad` fails to evaluate and `list` is no object: both are left out, as flagd does.
    assert_eq!(
        keys,
        [
            "child", "guarded", "half", "huge", "object", "off", "on", "targeted", "text", "whole"
        ]
    );
    let targeted = &all.flags["targeted"];
    assert_eq!(
        (&*targeted.reason, &*targeted.variant, &targeted.value),
        (
            "TARGETING_MATCH",
            "on",
            &Some(v1::any_flag::Value::BoolValue(true))
        )
    );
    assert_eq!(
        all.flags["whole"].value,
        Some(v1::any_flag::Value::DoubleValue(0.0))
    );
    assert_eq!(strings(&all.metadata)["flagSetId"], "prod");
    replica.stop().await;
}

/// The next event of a stream (type, `data.flags` as key → type), within 5 s.
async fn next_event(
    events: &mut tonic::Streaming<v2::EventStreamResponse>,
) -> Result<(String, BTreeMap<String, String>), tonic::Status> {
    let event = tokio::time::timeout(Duration::from_secs(5), events.message())
        .await
        .expect("an event within 5 s")?
        .expect("the stream goes on");
    let mut flags = BTreeMap::new();
    if let Some(Kind::StructValue(changed)) = event
        .data
        .as_ref()
        .and_then(|d| d.fields.get("flags"))
        .and_then(|f| f.kind.clone())
    {
        for (key, value) in changed.fields {
            let Some(Kind::StructValue(kind)) = value.kind else {
                panic!("{key}: not an object")
            };
            let Some(Kind::StringValue(kind)) = kind.fields["type"].kind.clone() else {
                panic!("{key}: no type")
            };
            flags.insert(key, kind);
        }
    }
    Ok((event.r#type, flags))
}

#[tokio::test]
async fn the_event_stream_names_changed_flags_and_their_dependents() {
    let mut fake = FakeUpstream::start().await;
    let (replica, sub) = serving(&mut fake, |config| config.flagd_keepalive_s = 1).await;
    let mut client = client(&replica).await;
    let started = tokio::time::Instant::now();
    let mut events = client
        .event_stream(v2::EventStreamRequest {})
        .await
        .unwrap()
        .into_inner();
    let ready = next_event(&mut events).await.unwrap();
    assert_eq!(ready.0, "provider_ready");
    assert!(started.elapsed() < Duration::from_millis(500));
    // Then every flag of the namespace, once: a reconnecting provider drops what it cached.
    let every = next_event(&mut events).await.unwrap();
    assert_eq!(every.0, "configuration_change");
    assert_eq!(
        every.1.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "bad", "child", "guarded", "half", "huge", "list", "object", "off", "on", "targeted",
            "text", "whole"
        ]
    );
    assert!(every.1.values().all(|kind| kind == "update"));

    // `off` changes: `child` (its prerequisite) may change too; `new` is created; `text` goes;
    // a change of another namespace is not announced.
    let mut off = flag("prod", "off", 6);
    off.enabled = true;
    off.stamp.created_revision = 2;
    sub.send([put(6, vec![off, flag("prod", "new", 6)])]).await;
    assert_eq!(
        next_event(&mut events).await.unwrap(),
        (
            "configuration_change".to_string(),
            [("child", "update"), ("new", "write"), ("off", "update")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into_iter()
                .collect()
        )
    );
    sub.send([put(7, vec![flag("dev", "y", 7)]), delete(8, "prod", "text")])
        .await;
    assert_eq!(
        next_event(&mut events).await.unwrap().1,
        [("text".to_string(), "delete".to_string())]
            .into_iter()
            .collect()
    );
    // Silence: a keep-alive after a second.
    assert_eq!(next_event(&mut events).await.unwrap().0, "keep_alive");

    // Shutdown: provider_shutdown, then an error (a provider reconnects only after one).
    let stopping = tokio::spawn(replica.stop());
    assert_eq!(
        next_event(&mut events).await.unwrap().0,
        "provider_shutdown"
    );
    let end = next_event(&mut events).await.unwrap_err();
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    stopping.await.unwrap();
}

#[tokio::test]
async fn event_streams_count_among_the_bounded_streams() {
    let mut fake = FakeUpstream::start().await;
    let (replica, _sub) = serving(&mut fake, |config| config.max_watch_streams = 2).await;
    let mut client = client(&replica).await;
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut events = client
            .event_stream(v2::EventStreamRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(next_event(&mut events).await.unwrap().0, "provider_ready");
        open.push(events);
    }
    let refused = client
        .event_stream(v2::EventStreamRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    drop(open);
    eventually("the streams are released", || {
        replica.handles.eval.watch_streams() == 0
    })
    .await;
    replica.stop().await;
}

#[tokio::test]
async fn a_large_namespace_is_announced_in_events_of_at_most_5000_flags() {
    let mut fake = FakeUpstream::start().await;
    let replica = Replica::start({
        let mut config = Config::local(fake.url.clone());
        config.flagd_default_namespace = "big".into();
        config
    })
    .await;
    let subscription = fake.next().await;
    let flags = (0..5_001)
        .map(|i| flag("big", &format!("f{i:05}"), 1))
        .collect();
    subscription.send(snapshot(5, flags)).await;
    eventually("the snapshot", || replica.handles.state.revision() == 5).await;
    let mut client = client(&replica).await;
    let mut events = client
        .event_stream(v2::EventStreamRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next_event(&mut events).await.unwrap().0, "provider_ready");
    let first = next_event(&mut events).await.unwrap().1;
    let second = next_event(&mut events).await.unwrap().1;
    assert_eq!((first.len(), second.len()), (5_000, 1));
    assert!(second.contains_key("f05000"));
    replica.stop().await;
}

#[tokio::test]
async fn an_event_stream_outlives_a_client_pinging_often() {
    let mut fake = FakeUpstream::start().await;
    let (replica, sub) = serving(&mut fake, |_| {}).await;
    // A client that pings every 50 ms, idle or not (gRPC clients' keepalive): the replica
    // answers the pings and keeps the stream, where servers with a ping policy would close
    // the connection (GOAWAY, too many pings).
    let channel = tonic::transport::Endpoint::from_shared(replica.url.clone())
        .unwrap()
        .http2_keep_alive_interval(Duration::from_millis(50))
        .keep_alive_while_idle(true)
        .keep_alive_timeout(Duration::from_secs(1))
        .connect()
        .await
        .unwrap();
    let mut client = Client::new(channel);
    let mut events = client
        .event_stream(v2::EventStreamRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next_event(&mut events).await.unwrap().0, "provider_ready");
    assert_eq!(
        next_event(&mut events).await.unwrap().0,
        "configuration_change"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    sub.send([put(6, vec![flag("prod", "new", 6)])]).await;
    let change = next_event(&mut events).await.unwrap();
    assert_eq!(change.1.keys().collect::<Vec<_>>(), ["new"]);
    assert!(
        boolean(&mut client, "new", serde_json::json!({}), &[])
            .await
            .is_ok()
    );
    replica.stop().await;
}
