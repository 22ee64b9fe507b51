//! OFREP served by `flagread::run_with` on 127.0.0.1:0, following a fake upstream, through a
//! plain HTTP/1.1 client: every type and reason, the error statuses and bodies the OFREP
//! providers read, tokens and anonymous namespaces, load shedding with `Retry-After`, the bulk
//! endpoint's ETag and 304, CORS, the selector and the request counters.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use flagread::Config;
use flagstream::model::{self, Value};
use serde_json::{Value as Json, json};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Namespace `prod`: a flag of every type and reason. `dev` holds one flag.
fn flags() -> Vec<model::Flag> {
    let mut shadowing = flag("prod", "shadowing", 2);
    shadowing.metadata = [("flagSetId", "mine"), ("revision", "x"), ("team", "b")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut flags = reason_flags("prod");
    flags.extend([
        shadowing,
        flag("prod", "x:y%", 2),
        typed(
            "prod",
            "text",
            [Value::String(String::new()), Value::String("x".into())],
        ),
        typed("prod", "whole", [Value::Number(20.0), Value::Number(3.0)]),
        typed("prod", "half", [Value::Number(1.5), Value::Number(2.0)]),
        typed(
            "prod",
            "object",
            [
                Value::Json(json!({"color": "blue", "sizes": [1, 2]})),
                Value::Json(json!({})),
            ],
        ),
        typed(
            "prod",
            "list",
            [Value::Json(json!([1, "two"])), Value::Json(json!({}))],
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

/// Request headers: (name, value).
type Headers<'a> = Vec<(&'a str, &'a str)>;

/// An HTTP answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// Header names in lower case.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }

    fn json(&self) -> Json {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text()))
    }
}

/// Sends one HTTP/1.1 request (`Connection: close`) and reads the whole answer.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    // The server may answer (and close) before it has read a body it refuses.
    let _ = stream.write_all(request.as_bytes()).await;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let read = async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => raw.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("an answer within 10 s");
    parse_answer(&raw)
}

fn parse_answer(raw: &[u8]) -> Answer {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete head");
    let head = std::str::from_utf8(&raw[..end]).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|line| {
            let (name, value) = line.split_once(':').unwrap();
            (name.trim().to_ascii_lowercase(), value.trim().to_string())
        })
        .collect();
    let body = raw[end + 4..].to_vec();
    if let Some((_, length)) = headers.iter().find(|(n, _)| n == "content-length") {
        assert_eq!(body.len(), length.parse::<usize>().unwrap(), "{head}");
    }
    assert!(
        !headers.iter().any(|(n, _)| n == "transfer-encoding"),
        "answers have a known length: {head}"
    );
    Answer {
        status,
        headers,
        body,
    }
}

/// POSTs `body` to the single-flag route of `key` (already percent-encoded as needed).
async fn one(replica: &Replica, key: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let path = format!("/ofrep/v1/evaluate/flags/{key}");
    http(replica.handles.ofrep_listen, "POST", &path, headers, body).await
}

/// POSTs `body` to the bulk route.
async fn bulk(replica: &Replica, headers: &[(&str, &str)], body: &str) -> Answer {
    let addr = replica.handles.ofrep_listen;
    http(addr, "POST", "/ofrep/v1/evaluate/flags", headers, body).await
}

fn context(ctx: Json) -> String {
    json!({ "context": ctx }).to_string()
}

#[tokio::test]
async fn every_type_and_reason_is_answered_with_its_value_variant_and_metadata() {
    let mut fake = FakeUpstream::start().await;
    let (replica, _sub) = serving(&mut fake, |_| {}).await;
    // (key, context, value, variant, reason)
    let cases = [
        ("on", json!({}), json!(true), "on", "STATIC"),
        ("off", json!({}), json!(false), "off", "DISABLED"),
        ("targeted", json!({}), json!(false), "off", "DEFAULT"),
        (
            "targeted",
            json!({"plan": "pro", "targetingKey": null}),
            json!(true),
            "on",
            "TARGETING_MATCH",
        ),
        // A failed prerequisite serves the disabled variant.
        ("child", json!({}), json!(false), "off", "DISABLED"),
        // No rules, but a prerequisite: never STATIC.
        ("guarded", json!({}), json!(true), "on", "DEFAULT"),
        ("text", json!({}), json!(""), "a", "STATIC"),
        ("whole", json!({}), json!(20.0), "a", "STATIC"),
        ("half", json!({}), json!(1.5), "a", "STATIC"),
        (
            "object",
            json!({}),
            json!({"color": "blue", "sizes": [1, 2]}),
            "a",
            "STATIC",
        ),
        // OFREP has no object-only rule: a JSON flag serves any JSON value.
        ("list", json!({}), json!([1, "two"]), "a", "STATIC"),
    ];
    for (key, ctx, value, variant, reason) in cases {
        let what = format!("{key} {ctx}");
        let answer = one(&replica, key, &[], &context(ctx)).await;
        assert_eq!(answer.status, 200, "{what}: {}", answer.text());
        assert_eq!(answer.header("content-type"), Some("application/json"));
        let body = answer.json();
        assert_eq!(body["key"], json!(key), "{what}");
        assert_eq!(body["value"], value, "{what}");
        assert_eq!(body["variant"], json!(variant), "{what}");
        assert_eq!(body["reason"], json!(reason), "{what}");
    }
    // A whole number of a NUMBER flag is written as a float, so typed SDKs read a float.
    let whole = one(&replica, "whole", &[], "").await;
    assert!(whole.text().contains("\"value\":20.0,"), "{}", whole.text());
    // Metadata: the flag's, plus the namespace and the revision; ours win over the flag's own.
    let on = one(&replica, "on", &[], "{}").await.json();
    assert_eq!(
        on["metadata"],
        json!({"owner": "team-a", "flagSetId": "prod", "revision": 5})
    );
    let shadowing = one(&replica, "shadowing", &[], "").await;
    assert_eq!(
        shadowing.json()["metadata"],
        json!({"team": "b", "flagSetId": "prod", "revision": 5}),
        "{}",
        shadowing.text()
    );
    // An empty body, `{}` and a null context are all an empty context.
    for body in ["", "{}", "{\"context\": null}", "  \n"] {
        let answer = one(&replica, "targeted", &[], body).await;
        assert_eq!(answer.json()["reason"], json!("DEFAULT"), "{body:?}");
    }
    replica.stop().await;
}

#[tokio::test]
async fn errors_carry_the_status_code_and_details_the_spec_names() {
    let mut fake = FakeUpstream::start().await;
    let (replica, _sub) = serving(&mut fake, |_| {}).await;
    let oversized = format!(
        "{{\"context\": {{\"pad\": \"{}\"}}}}",
        "x".repeat(flagstream::validate::MAX_REQUEST_BYTES)
    );
    // (key, body, status, errorCode, part of errorDetails)
    let cases = [
        (
            "missing",
            String::new(),
            404,
            "FLAG_NOT_FOUND",
            "flag \"missing\" not found in namespace \"prod\"",
        ),
        (
            "on",
            context(json!({"targetingKey": 7})),
            400,
            "INVALID_CONTEXT",
            "context.\"targetingKey\": must be a string",
        ),
        (
            "on",
            context(json!({"deep": [[[[[[[[1]]]]]]]]})),
            400,
            "INVALID_CONTEXT",
            "nested more than 8 levels deep",
        ),
        (
            "on",
            "{\"context\": \"me\"}".into(),
            400,
            "INVALID_CONTEXT",
            "context: must be an object",
        ),
        (
            "on",
            "{\"context\": {".into(),
            400,
            "PARSE_ERROR",
            "not JSON",
        ),
        ("on", "[1]".into(), 400, "PARSE_ERROR", "must be an object"),
        ("on", oversized, 400, "PARSE_ERROR", "over 4194304 bytes"),
        (
            "bad",
            context(json!({"plan": "pro"})),
            500,
            "GENERAL",
            "could not be evaluated",
        ),
    ];
    for (key, body, status, code, details) in cases {
        let answer = one(&replica, key, &[], &body).await;
        assert_eq!(answer.status, status, "{key}: {}", answer.text());
        assert_eq!(answer.header("content-type"), Some("application/json"));
        let body = answer.json();
        assert_eq!(body["key"], json!(key), "{body}");
        assert_eq!(body["errorCode"], json!(code), "{body}");
        let got = body["errorDetails"].as_str().unwrap_or_default();
        assert!(got.contains(details), "{key}: {got:?}, wanted {details:?}");
    }
    // `minRevision` in a header that is not a revision.
    let answer = one(&replica, "on", &[("flagstream-min-revision", "soon")], "").await;
    assert_eq!(
        (answer.status, answer.json()["errorCode"].clone()),
        (400, json!("INVALID_CONTEXT"))
    );
    // Bulk refusals carry no key.
    let answer = bulk(&replica, &[], "nope").await;
    assert_eq!(answer.status, 400);
    assert_eq!(
        answer
            .json()
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["errorCode", "errorDetails"]
    );
    replica.stop().await;
}

#[tokio::test]
async fn a_percent_encoded_key_is_decoded() {
    let mut fake = FakeUpstream::start().await;
    let (replica, _sub) = serving(&mut fake, |_| {}).await;
    let found = one(&replica, "x%3Ay%25", &[], "").await;
    assert_eq!(found.status, 200, "{}", found.text());
    assert_eq!(found.json()["key"], json!("x:y%"));
    let slash = one(&replica, "a%2Fb", &[], "").await;
    assert_eq!(slash.status, 404);
    assert_eq!(slash.json()["key"], json!("a/b"));
    replica.stop().await;
}

#[tokio::test]
async fn the_selector_names_the_namespace() {
    let mut fake = FakeUpstream::start().await;
    let (replica, _sub) = serving(&mut fake, |_| {}).await;
    for selector in ["flagSetId=dev", "dev"] {
        let answer = one(&replica, "x", &[("Flagd-Selector", selector)], "").await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.json()["metadata"]["flagSetId"], json!("dev"));
    }
    // `on` is in the default namespace, not in `dev`; an unknown namespace has no flags.
    let missing = one(&replica, "on", &[("flagd-selector", "dev")], "").await;
    assert_eq!(missing.status, 404);
    let unknown = one(&replica, "on", &[("flagd-selector", "nope")], "").await;
    assert_eq!(unknown.status, 404);
    let bad = one(&replica, "on", &[("flagd-selector", "source=x")], "").await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["errorCode"], json!("INVALID_CONTEXT"));
    let none = bulk(&replica, &[("flagd-selector", "nope")], "").await;
    assert_eq!(
        (none.status, none.json()["flags"].clone()),
        (200, json!([]))
    );
    replica.stop().await;
}

#[tokio::test]
async fn tokens_are_optional_only_for_anonymous_namespaces_and_refusals_have_no_body() {
    let dir = temp_dir("ofrep-tokens");
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, "web eval:prod web-secret-0123456789\n").unwrap();
    let mut fake = FakeUpstream::start().await;
    let (replica, _sub) = serving(&mut fake, |config| {
        config.dev_no_auth = false;
        config.tokens_file = Some(tokens);
        config.anonymous_namespaces = vec!["dev".into()];
    })
    .await;
    let web = ("Authorization", "Bearer web-secret-0123456789");
    let dev = ("flagd-selector", "dev");
    let cases: [(&str, Headers, u16); 6] = [
        ("x", vec![dev], 200),
        ("on", vec![], 401),
        ("on", vec![web], 200),
        ("x", vec![dev, web], 403),
        (
            "x",
            vec![dev, ("authorization", "Bearer wrong-secret-000000")],
            401,
        ),
        ("on", vec![("authorization", "Basic abc")], 401),
    ];
    for (key, headers, status) in cases {
        let answer = one(&replica, key, &headers, "").await;
        assert_eq!(
            answer.status,
            status,
            "{key} {headers:?}: {}",
            answer.text()
        );
        if status != 200 {
            assert!(answer.body.is_empty(), "{status}: {}", answer.text());
        }
        let all = bulk(&replica, &headers, "").await;
        assert_eq!(all.status, status, "bulk {headers:?}");
    }
    replica.stop().await;
}

#[tokio::test]
async fn shed_load_and_held_waits_answer_429_with_retry_after() {
    let mut fake = FakeUpstream::start().await;
    let (replica, sub) = serving(&mut fake, |config| {
        config.concurrency_limit = 1;
        config.max_revision_waits = 1;
    })
    .await;
    // The replica's only permit is taken: both routes shed the call.
    let permit = replica.handles.eval.occupy_permit().expect("a free permit");
    for answer in [
        one(&replica, "on", &[], "").await,
        bulk(&replica, &[], "").await,
    ] {
        assert_eq!(answer.status, 429, "{}", answer.text());
        assert_eq!(answer.header("retry-after"), Some("1"));
        assert!(answer.body.is_empty());
    }
    drop(permit);
    assert_eq!(one(&replica, "on", &[], "").await.status, 200);

    // A minRevision wait holds the replica's only wait slot (and no permit): the next call
    // that would wait is refused at once, one that need not wait is served.
    let waiting = tokio::spawn({
        let addr = replica.handles.ofrep_listen;
        async move {
            let path = "/ofrep/v1/evaluate/flags/on";
            http(addr, "POST", path, &[], &context(json!({"minRevision": 6}))).await
        }
    });
    eventually("the wait is open", || {
        replica.handles.eval.revision_waits() == 1
    })
    .await;
    let refused = one(&replica, "on", &[("flagstream-min-revision", "6")], "").await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(one(&replica, "on", &[], "").await.status, 200);
    let mut later = flag("prod", "on", 6);
    later.enabled = false;
    sub.send([heartbeat(6), put(6, vec![later])]).await;
    let read = waiting.await.unwrap();
    assert_eq!(read.status, 200, "{}", read.text());
    assert_eq!(read.json()["reason"], json!("DISABLED"));
    assert_eq!(read.json()["metadata"]["revision"], json!(6));
    replica.stop().await;
}

#[tokio::test]
async fn a_replica_without_state_answers_503_with_retry_after() {
    let fake = FakeUpstream::start().await;
    let replica = Replica::start(Config::local(fake.url.clone())).await;
    for answer in [
        one(&replica, "on", &[], "").await,
        bulk(&replica, &[], "").await,
    ] {
        assert_eq!(answer.status, 503, "{}", answer.text());
        assert_eq!(answer.header("retry-after"), Some("1"));
        assert_eq!(answer.json()["errorCode"], json!("GENERAL"));
        let details = answer.json()["errorDetails"].as_str().unwrap().to_string();
        assert!(details.contains("no full state yet"), "{details}");
    }
    replica.stop().await;
}

#[tokio::test]
async fn bulk_answers_every_flag_with_an_etag_and_304_until_the_answer_changes() {
    let mut fake = FakeUpstream::start().await;
    let (replica, sub) = serving(&mut fake, |_| {}).await;
    let pro = context(json!({"plan": "pro"}));
    let first = bulk(&replica, &[], &pro).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.header("content-type"), Some("application/json"));
    assert_eq!(first.header("access-control-expose-headers"), Some("ETag"));
    let etag = first.header("etag").expect("an ETag").to_string();
    let body = first.json();
    assert_eq!(
        body["metadata"],
        json!({"flagSetId": "prod", "revision": 5})
    );
    let flags = body["flags"].as_array().unwrap();
    let keys: Vec<&str> = flags.iter().map(|f| f["key"].as_str().unwrap()).collect();
    assert_eq!(
        keys,
        [
            "bad",
            "child",
            "guarded",
            "half",
            "list",
            "object",
            "off",
            "on",
            "shadowing",
            "targeted",
            "text",
            "whole",
            "x:y%"
        ]
    );
    // A flag that cannot be evaluated is an error inside the list.
    assert_eq!(flags[0]["errorCode"], json!("GENERAL"));
    assert!(
        flags[0]["errorDetails"]
            .as_str()
            .unwrap()
            .contains("could not be evaluated")
    );
    let targeted = &flags[9];
    assert_eq!(
        (
            &targeted["value"],
            &targeted["variant"],
            &targeted["reason"]
        ),
        (&json!(true), &json!("on"), &json!("TARGETING_MATCH"))
    );
    assert_eq!(flags[11]["value"], json!(20.0));
    assert!(first.text().contains("\"value\":20.0,"));

    // The same question: 304 without a body, weak or listed tags too.
    for tag in [
        etag.clone(),
        format!("W/{etag}"),
        format!("\"other\", {etag}"),
    ] {
        let again = bulk(&replica, &[("If-None-Match", &tag)], &pro).await;
        assert_eq!(again.status, 304, "{tag}");
        assert!(again.body.is_empty());
        assert_eq!(again.header("etag"), Some(etag.as_str()));
        assert_eq!(again.header("access-control-expose-headers"), Some("ETag"));
    }
    // Another context: another answer and tag.
    let plain = bulk(&replica, &[("If-None-Match", &etag)], "").await;
    assert_eq!(plain.status, 200);
    assert_ne!(plain.header("etag"), Some(etag.as_str()));

    // A change: a new tag, and the old one no longer matches.
    let mut later = flag("prod", "text", 6);
    later.enabled = false;
    sub.send([put(6, vec![later])]).await;
    eventually("the change", || replica.handles.state.revision() == 6).await;
    let changed = bulk(&replica, &[("If-None-Match", &etag)], &pro).await;
    assert_eq!(changed.status, 200);
    let new_etag = changed.header("etag").unwrap().to_string();
    assert_ne!(new_etag, etag);
    assert_eq!(changed.json()["metadata"]["revision"], json!(6));
    let settled = bulk(&replica, &[("If-None-Match", &new_etag)], &pro).await;
    assert_eq!(settled.status, 304);
    replica.stop().await;
}

#[tokio::test]
async fn bulk_evaluations_of_large_namespaces_are_answered_whole() {
    let mut fake = FakeUpstream::start().await;
    let config = Config::local(fake.url.clone());
    let replica = Replica::start(config).await;
    let sub = fake.next().await;
    let many: Vec<model::Flag> = (0..1_000)
        .map(|i| flag("default", &format!("f{i:04}"), 1))
        .collect();
    sub.send(snapshot(1, many)).await;
    eventually("the snapshot", || replica.handles.state.revision() == 1).await;
    let answer = bulk(&replica, &[], "").await;
    assert_eq!(answer.status, 200);
    let flags = answer.json()["flags"].as_array().unwrap().clone();
    assert_eq!(flags.len(), 1_000);
    assert_eq!(flags[999]["key"], json!("f0999"));
    replica.stop().await;
}

#[tokio::test]
async fn cors_headers_only_for_configured_origins() {
    let preflight = [
        ("Origin", "https://app.example"),
        ("Access-Control-Request-Method", "POST"),
        (
            "Access-Control-Request-Headers",
            "content-type,flagd-selector,if-none-match",
        ),
    ];
    let mut fake = FakeUpstream::start().await;

    // None configured: no CORS headers, and no preflight.
    let (replica, _sub) = serving(&mut fake, |_| {}).await;
    let addr = replica.handles.ofrep_listen;
    let answer = http(addr, "OPTIONS", "/ofrep/v1/evaluate/flags", &preflight, "").await;
    assert_eq!(answer.status, 405);
    assert_eq!(answer.header("access-control-allow-origin"), None);
    let post = bulk(&replica, &[preflight[0]], "").await;
    assert_eq!(post.status, 200);
    assert_eq!(post.header("access-control-allow-origin"), None);
    replica.stop().await;

    // One origin configured.
    let (replica, _sub) = serving(&mut fake, |config| {
        config.ofrep_cors_origins = vec!["https://app.example".into()];
    })
    .await;
    let addr = replica.handles.ofrep_listen;
    for path in ["/ofrep/v1/evaluate/flags", "/ofrep/v1/evaluate/flags/on"] {
        let answer = http(addr, "OPTIONS", path, &preflight, "").await;
        assert_eq!(answer.status, 200, "{path}");
        assert_eq!(
            answer.header("access-control-allow-origin"),
            Some("https://app.example")
        );
        assert!(
            answer
                .header("access-control-allow-methods")
                .unwrap()
                .contains("POST")
        );
        let allowed = answer.header("access-control-allow-headers").unwrap();
        for name in [
            "content-type",
            "flagd-selector",
            "if-none-match",
            "authorization",
        ] {
            assert!(allowed.contains(name), "{allowed}");
        }
    }
    let other = [("Origin", "https://evil.example"), preflight[1]];
    let answer = http(addr, "OPTIONS", "/ofrep/v1/evaluate/flags", &other, "").await;
    assert_eq!(answer.header("access-control-allow-origin"), None);
    let post = bulk(&replica, &[preflight[0]], "").await;
    assert_eq!(post.status, 200);
    assert_eq!(
        post.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    let exposed = post
        .header("access-control-expose-headers")
        .unwrap()
        .to_lowercase();
    assert!(
        exposed.contains("etag") && exposed.contains("retry-after"),
        "{exposed}"
    );
    replica.stop().await;
}

#[tokio::test]
async fn requests_are_counted_by_route_and_status() {
    let mut fake = FakeUpstream::start().await;
    let (replica, _sub) = serving(&mut fake, |_| {}).await;
    one(&replica, "on", &[], "").await;
    one(&replica, "on", &[], "").await;
    one(&replica, "missing", &[], "").await;
    bulk(&replica, &[], "").await;
    let metrics = http(replica.handles.metrics_listen, "GET", "/metrics", &[], "").await;
    let text = metrics.text();
    for line in [
        "flagread_ofrep_requests_total{route=\"flag\",status=\"200\"} 2",
        "flagread_ofrep_requests_total{route=\"flag\",status=\"404\"} 1",
        "flagread_ofrep_requests_total{route=\"bulk\",status=\"200\"} 1",
        "flagread_ofrep_requests_total{route=\"bulk\",status=\"429\"} 0",
    ] {
        assert!(text.contains(line), "{line} in:\n{text}");
    }
    replica.stop().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_does_not_hold_up_the_drain() {
    let mut fake = FakeUpstream::start().await;
    let (replica, _sub) = serving(&mut fake, |_| {}).await;
    let mut stream = tokio::net::TcpStream::connect(replica.handles.ofrep_listen)
        .await
        .unwrap();
    let request =
        "POST /ofrep/v1/evaluate/flags/on HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n";
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // The connection stays open and idle; the replica still stops within its bound.
    let started = tokio::time::Instant::now();
    replica.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    drop(stream);
}
