//! Hostile and careless calls on every RPC of FlagAdmin, FlagEval and Replication, sent as raw
//! HTTP/2 (tests/cluster/raw.rs) to the real binaries: bad input (garbage, unframed bytes,
//! truncated messages and frames, invalid UTF-8, deeply nested JSON, huge contexts, oversized
//! requests) and an auth matrix (no token, unknown token, other schemes, each scope, a token
//! limited to another namespace, case variants of the bearer scheme). Every case goes through
//! one `check` helper against a table of expected codes; after each, the server is alive and
//! the writer's head revision has not moved.
//!
//! Undecodable requests (garbage, cut frames, invalid UTF-8) are answered INVALID_ARGUMENT, not
//! the INTERNAL tonic gives them (`flagstream::kit::grpc::MalformedRequests`).

mod cluster;

use std::time::Duration;

use cluster::raw::{self, Outcome, code_name, frame};
use cluster::{ADMIN, ADMIN_READ, Dir, EVAL, EVAL_DEMO, Replica, ReplicaOptions, SYNC, Writer};
use flagstream::pb;
use prost::Message;

/// Which server answers an RPC, and what scope it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// FlagAdmin writes: `admin`.
    AdminWrite,
    /// FlagAdmin reads: `admin` or `admin-read`.
    AdminRead,
    /// Replication: `sync`.
    Sync,
    /// FlagEval of one namespace: `eval` or `eval:<that namespace>`.
    Eval,
    /// FlagEval of the whole replica (GetStateDigest): `eval` for every namespace, or `sync`.
    EvalWhole,
}

/// One RPC: its path, kind, and a valid request for namespace `ns` carrying `text` in one of
/// its string fields (writes are dry runs: `validate_only`).
struct Rpc {
    path: &'static str,
    kind: Kind,
    request: fn(ns: &str, text: &str) -> Vec<u8>,
}

/// What a case may be answered with.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Exactly this code.
    Code(i32),
    /// A code that says the caller got through authentication and authorization: anything but
    /// UNAUTHENTICATED, PERMISSION_DENIED, UNKNOWN and INTERNAL.
    Allowed,
    /// A refusal of a malformed request: INVALID_ARGUMENT, RESOURCE_EXHAUSTED or OUT_OF_RANGE.
    Malformed,
    /// A refusal of a well-formed request that breaks a documented limit: INVALID_ARGUMENT or
    /// RESOURCE_EXHAUSTED or OUT_OF_RANGE.
    Refused,
}

const INVALID_ARGUMENT: i32 = 3;
const PERMISSION_DENIED: i32 = 7;
const RESOURCE_EXHAUSTED: i32 = 8;
const OUT_OF_RANGE: i32 = 11;
const INTERNAL: i32 = 13;
const UNAUTHENTICATED: i32 = 16;

fn options() -> Option<pb::WriteOptions> {
    Some(pb::WriteOptions {
        validate_only: true,
        comment: "dry run".into(),
    })
}

fn bool_variant(name: &str, value: bool) -> pb::Variant {
    pb::Variant {
        name: name.into(),
        value: Some(pb::TypedValue {
            kind: Some(pb::typed_value::Kind::BoolValue(value)),
        }),
        description: String::new(),
    }
}

fn flag(ns: &str, key: &str) -> pb::Flag {
    pb::Flag {
        namespace: ns.into(),
        key: key.into(),
        r#type: pb::FlagType::Boolean as i32,
        variants: vec![bool_variant("on", true), bool_variant("off", false)],
        enabled: true,
        disabled_variant: "off".into(),
        default_variant: "on".into(),
        ..Default::default()
    }
}

fn segment(ns: &str, key: &str, description: &str) -> pb::Segment {
    pb::Segment {
        namespace: ns.into(),
        key: key.into(),
        description: description.into(),
        constraints: vec![pb::Constraint {
            attribute: "plan".into(),
            operator: pb::Operator::In as i32,
            values: vec!["pro".into()],
            inverted: false,
            case_insensitive: false,
        }],
        stamp: None,
    }
}

fn context(user: &str) -> Option<pb::Context> {
    Some(pb::Context {
        user_id: user.into(),
        ..Default::default()
    })
}

/// Every RPC of the three services. The namespace `demo` holds flag `f` and segment `s`.
fn rpcs() -> Vec<Rpc> {
    use Kind::*;
    vec![
        Rpc {
            path: "/flagstream.v1.FlagAdmin/CreateNamespace",
            kind: AdminWrite,
            request: |_, t| {
                pb::CreateNamespaceRequest {
                    namespace: Some(pb::Namespace {
                        key: "fresh".into(),
                        description: t.into(),
                        stamp: None,
                    }),
                    options: options(),
                }
                .encode_to_vec()
            },
        },
        Rpc {
            path: "/flagstream.v1.FlagAdmin/ListNamespaces",
            kind: AdminRead,
            request: |_, _| pb::ListNamespacesRequest {}.encode_to_vec(),
        },
        Rpc {
            path: "/flagstream.v1.FlagAdmin/DeleteNamespace",
            kind: AdminWrite,
            request: |ns, t| {
                pb::DeleteNamespaceRequest {
                    namespace: ns.into(),
                    options: Some(pb::WriteOptions {
                        validate_only: true,
                        comment: t.into(),
                    }),
                }
                .encode_to_vec()
            },
        },
        Rpc {
            path: "/flagstream.v1.FlagAdmin/CreateFlag",
            kind: AdminWrite,
            request: |ns, t| {
                let mut flag = flag(ns, "new-flag");
                flag.description = t.into();
                pb::CreateFlagRequest {
                    flag: Some(flag),
                    options: options(),
                }
                .encode_to_vec()
            },
        },
        Rpc {
            path: "/flagstream.v1.FlagAdmin/UpdateFlag",
            kind: AdminWrite,
            request: |ns, t| {
                let mut flag = flag(ns, "f");
                flag.description = t.into();
                pb::UpdateFlagRequest {
                    flag: Some(flag),
                    expected_revision: 0,
                    options: options(),
                }
                .encode_to_vec()
            },
        },
        Rpc {
            path: "/flagstream.v1.FlagAdmin/SetFlagEnabled",
            kind: AdminWrite,
            request: |ns, t| {
                pb::SetFlagEnabledRequest {
                    namespace: ns.into(),
                    key: "f".into(),
                    enabled: false,
                    expected_revision: 0,
                    options: Some(pb::WriteOptions {
                        validate_only: true,
                        comment: t.into(),
                    }),
                }
                .encode_to_vec()
            },
        },
        Rpc {
            path: "/flagstream.v1.FlagAdmin/DeleteFlag",
            kind: AdminWrite,
            request: |ns, t| {
                pb::DeleteFlagRequest {
                    namespace: ns.into(),
                    key: "f".into(),
                    expected_revision: 0,
                    options: Some(pb::WriteOptions {
                        validate_only: true,
                        comment: t.into(),
                    }),
                }
                .encode_to_vec()
            },
        },
        Rpc {
            path: "/flagstream.v1.FlagAdmin/GetFlag",
            kind: AdminRead,
            request: |ns, t| {
                pb::GetFlagRequest {
                    namespace: ns.into(),
                    key: t.into(),
                }
                .encode_to_vec()
            },
        },
        Rpc {
            path: "/flagstream.v1.FlagAdmin/ListFlags",
            kind: AdminRead,
            request: |ns, t| {
                pb::ListFlagsRequest {
                    namespace: ns.into(),
                    key_prefix: t.into(),
                    ..Default::default()
                }
                .encode_to_vec()
            },
        },
        Rpc {
            path: "/flagstream.v1.FlagAdmin/CreateSegment",
            kind: AdminWrite,
            request: |ns, t| {
                pb::CreateSegmentRequest {
                    segment: Some(segment(ns, "new-segment", t)),
                    options: options(),
                }
                .encode_to_vec()
            },
        },
        Rpc {
            path: "/flagstream.v1.FlagAdmin/UpdateSegment",
            kind: AdminWrite,
            request: |ns, t| {
                pb::UpdateSegmentRequest {
                    segment: Some(segment(ns, "s", t)),
                    expected_revision: 0,
                    options: options(),
                }
                .encode_to_vec()
            },
        },
        Rpc {
            path: "/flagstream.v1.FlagAdmin/DeleteSegment",
            kind: AdminWrite,
            request: |ns, t| {
                pb::DeleteSegmentRequest {
                    namespace: ns.into(),
                    key: "s".into(),
                    expected_revision: 0,
                    options: Some(pb::WriteOptions {
                        validate_only: true,
                        comment: t.into(),
                    }),
                }
                .encode_to_vec()
            },
        },
        Rpc {
            path: "/flagstream.v1.FlagAdmin/GetSegment",
            kind: AdminRead,
            request: |ns, t| {
                pb::GetSegmentRequest {
                    namespace: ns.into(),
                    key: t.into(),
                }
                .encode_to_vec()
            },
        },
        Rpc {
            path: "/flagstream.v1.FlagAdmin/ListSegments",
            kind: AdminRead,
            request: |ns, t| {
                pb::ListSegmentsRequest {
                    namespace: ns.into(),
                    page_size: 10,
                    page_token: t.into(),
                }
                .encode_to_vec()
            },
        },
        Rpc {
            path: "/flagstream.v1.FlagAdmin/ListHistory",
            kind: AdminRead,
            request: |ns, t| {
                pb::ListHistoryRequest {
                    namespace: ns.into(),
                    key: t.into(),
                    ..Default::default()
                }
                .encode_to_vec()
            },
        },
        Rpc {
            path: "/flagstream.v1.FlagAdmin/ExportNamespace",
            kind: AdminRead,
            request: |ns, t| {
                let namespace = if t == "f" {
                    ns.to_string()
                } else {
                    t.to_string()
                };
                pb::ExportNamespaceRequest { namespace }.encode_to_vec()
            },
        },
        Rpc {
            path: "/flagstream.v1.FlagAdmin/ImportNamespace",
            kind: AdminWrite,
            request: |ns, t| {
                let mut flag = flag(ns, "imported");
                flag.description = t.into();
                pb::ImportNamespaceRequest {
                    namespace: ns.into(),
                    source: Some(pb::import_namespace_request::Source::Bundle(
                        pb::NamespaceBundle {
                            namespace: Some(pb::Namespace {
                                key: ns.into(),
                                ..Default::default()
                            }),
                            flags: vec![flag],
                            segments: vec![],
                        },
                    )),
                    options: options(),
                }
                .encode_to_vec()
            },
        },
        Rpc {
            path: "/flagstream.v1.FlagAdmin/GetStateDigest",
            kind: AdminRead,
            request: |ns, t| {
                let namespaces = if t == "f" {
                    vec![ns.into()]
                } else {
                    vec![t.into()]
                };
                pb::GetStateDigestRequest { namespaces }.encode_to_vec()
            },
        },
        Rpc {
            path: "/flagstream.v1.FlagEval/Evaluate",
            kind: Eval,
            request: |ns, t| {
                pb::EvaluateRequest {
                    namespace: ns.into(),
                    flag_key: "f".into(),
                    context: context(t),
                    ..Default::default()
                }
                .encode_to_vec()
            },
        },
        Rpc {
            path: "/flagstream.v1.FlagEval/EvaluateBatch",
            kind: Eval,
            request: |ns, t| {
                pb::EvaluateBatchRequest {
                    namespace: ns.into(),
                    flag_keys: vec!["f".into(), t.into()],
                    context: context("u"),
                    min_revision: 0,
                }
                .encode_to_vec()
            },
        },
        Rpc {
            path: "/flagstream.v1.FlagEval/EvaluateAll",
            kind: Eval,
            request: |ns, t| {
                pb::EvaluateAllRequest {
                    namespace: ns.into(),
                    context: context(t),
                    min_revision: 0,
                }
                .encode_to_vec()
            },
        },
        Rpc {
            path: "/flagstream.v1.FlagEval/Watch",
            kind: Eval,
            request: |ns, t| {
                pb::WatchRequest {
                    namespace: ns.into(),
                    context: context(t),
                    flag_keys: vec!["f".into()],
                }
                .encode_to_vec()
            },
        },
        Rpc {
            // `namespaces` must be empty: the replica's digest covers what it follows.
            path: "/flagstream.v1.FlagEval/GetStateDigest",
            kind: EvalWhole,
            request: |_, _| pb::GetStateDigestRequest::default().encode_to_vec(),
        },
        Rpc {
            path: "/flagstream.v1.Replication/Subscribe",
            kind: Sync,
            request: |ns, t| {
                let namespaces = if t == "f" {
                    vec![ns.into()]
                } else {
                    vec![t.into()]
                };
                pb::SubscribeRequest {
                    from_revision: 0,
                    namespaces,
                    ..Default::default()
                }
                .encode_to_vec()
            },
        },
    ]
}

/// The running writer and replica the cases are sent to.
struct Servers {
    writer: Writer,
    replica: Replica,
    /// The writer's head after the set-up; no case may move it.
    head: u64,
}

impl Servers {
    async fn start(dir: &Dir) -> Servers {
        let mut writer = dir.writer();
        writer.start().await;
        let mut admin = writer.admin().await;
        for ns in ["demo", "other"] {
            let request = pb::CreateNamespaceRequest {
                namespace: Some(pb::Namespace {
                    key: ns.into(),
                    ..Default::default()
                }),
                options: None,
            };
            admin
                .create_namespace(cluster::authed(request, ADMIN))
                .await
                .unwrap();
            let request = pb::CreateFlagRequest {
                flag: Some(flag(ns, "f")),
                options: None,
            };
            admin
                .create_flag(cluster::authed(request, ADMIN))
                .await
                .unwrap();
            let request = pb::CreateSegmentRequest {
                segment: Some(segment(ns, "s", "")),
                options: None,
            };
            admin
                .create_segment(cluster::authed(request, ADMIN))
                .await
                .unwrap();
        }
        let mut replica = dir.replica("replica", &writer.url(), ReplicaOptions::default());
        replica.start();
        replica.serving().await;
        let head = writer.head().await;
        Servers {
            writer,
            replica,
            head,
        }
    }

    /// The port that serves `rpc`.
    fn port(&self, rpc: &Rpc) -> u16 {
        match rpc.kind {
            Kind::Eval | Kind::EvalWhole => self.replica.port,
            _ => self.writer.port,
        }
    }

    /// Sends one case and checks it against `expect`, then that both servers are alive and
    /// serving and the head has not moved. Returns the outcome, or what is wrong.
    async fn check(
        &mut self,
        rpc: &Rpc,
        case: &str,
        authorization: Option<&str>,
        body: Vec<u8>,
        expect: Expect,
    ) -> Result<Outcome, String> {
        let what = format!("{} [{case}]", rpc.path);
        let outcome = raw::call(
            self.port(rpc),
            rpc.path,
            authorization,
            body,
            Duration::from_millis(300),
        )
        .await
        .map_err(|e| format!("{what}: {e}"))?;
        let code = outcome.code;
        let fits = match expect {
            Expect::Code(want) => code == want,
            Expect::Allowed => ![UNAUTHENTICATED, PERMISSION_DENIED, 2, INTERNAL].contains(&code),
            Expect::Malformed | Expect::Refused => {
                [INVALID_ARGUMENT, RESOURCE_EXHAUSTED, OUT_OF_RANGE].contains(&code)
            }
        };
        let alive = self.writer.alive() && self.replica.alive();
        let health = tokio::time::timeout(Duration::from_secs(10), async {
            cluster::serving(self.writer.port, "").await;
            self.replica.serving().await;
        })
        .await
        .is_ok();
        let head = self.writer.head().await;
        let mut wrong = Vec::new();
        if !fits {
            wrong.push(format!(
                "answered {} {:?}, expected {expect:?}",
                code_name(code),
                short(&outcome.message)
            ));
        }
        if !alive || !health {
            wrong.push("a server died or stopped serving".into());
        }
        if head != self.head {
            wrong.push(format!("the head moved from {} to {head}", self.head));
            self.head = head;
        }
        if wrong.is_empty() {
            Ok(outcome)
        } else {
            Err(format!("{what}: {}", wrong.join("; ")))
        }
    }
}

/// The longest status message a case may be answered with: a value the server quotes is cut to
/// a short prefix (`flagstream::validate::shown`).
const MAX_ECHO: usize = 512;

fn short(message: &str) -> String {
    message.chars().take(120).collect()
}

/// A JSON value nested `depth` objects deep: `{"a": {"a": ... true}}`.
fn deep_json(depth: usize) -> prost_types::Value {
    let mut value = prost_types::Value {
        kind: Some(prost_types::value::Kind::BoolValue(true)),
    };
    for _ in 0..depth {
        let fields = [("a".to_string(), value)].into_iter().collect();
        value = prost_types::Value {
            kind: Some(prost_types::value::Kind::StructValue(prost_types::Struct {
                fields,
            })),
        };
    }
    value
}

/// A JSON flag whose variants are `value` and `null`.
fn json_flag(ns: &str, key: &str, value: prost_types::Value) -> pb::Flag {
    let json = |v: prost_types::Value| {
        Some(pb::TypedValue {
            kind: Some(pb::typed_value::Kind::JsonValue(v)),
        })
    };
    let null = prost_types::Value {
        kind: Some(prost_types::value::Kind::NullValue(0)),
    };
    pb::Flag {
        namespace: ns.into(),
        key: key.into(),
        r#type: pb::FlagType::Json as i32,
        variants: vec![
            pb::Variant {
                name: "deep".into(),
                value: json(value),
                description: String::new(),
            },
            pb::Variant {
                name: "none".into(),
                value: json(null),
                description: String::new(),
            },
        ],
        enabled: true,
        disabled_variant: "none".into(),
        default_variant: "deep".into(),
        ..Default::default()
    }
}

/// A context of `n` properties of `size` bytes each.
fn huge_context(n: usize, size: usize) -> Option<pb::Context> {
    Some(pb::Context {
        user_id: "u".into(),
        properties: (0..n)
            .map(|i| (format!("p{i}"), "x".repeat(size)))
            .collect(),
        ..Default::default()
    })
}

/// `valid` with an unknown length-delimited field 1000 of `size` bytes appended (decodes
/// fine; only its size is wrong).
fn padded(mut valid: Vec<u8>, size: usize) -> Vec<u8> {
    prost::encoding::encode_key(1000, prost::encoding::WireType::LengthDelimited, &mut valid);
    prost::encoding::encode_varint(size as u64, &mut valid);
    valid.resize(valid.len() + size, b'x');
    valid
}

/// The cases every RPC gets: name, request body (already framed), expectation.
fn common_cases(rpc: &Rpc) -> Vec<(&'static str, Vec<u8>, Expect)> {
    let valid = (rpc.request)("demo", "f");
    let mut cases = vec![
        ("garbage", frame(&[0xff; 12]), Expect::Malformed),
        (
            "unframed bytes",
            b"this is not a gRPC frame at all".to_vec(),
            Expect::Malformed,
        ),
        (
            "truncated message",
            {
                // A field that claims 64 bytes and brings 3.
                let mut cut = valid.clone();
                cut.extend_from_slice(&[0x0a, 64, b'a', b'b', b'c']);
                frame(&cut)
            },
            Expect::Malformed,
        ),
        (
            "truncated frame",
            {
                // The frame announces 100 bytes more than the body carries.
                let mut f = frame(&valid);
                let len = (valid.len() + 100) as u32;
                f[1..5].copy_from_slice(&len.to_be_bytes());
                f
            },
            Expect::Malformed,
        ),
        (
            "oversized request",
            frame(&padded(valid.clone(), 5 << 20)),
            Expect::Refused,
        ),
    ];
    // Invalid UTF-8 in a string field: the marker's bytes replaced in place (lengths stay).
    let marked = (rpc.request)("demo", "MARKER");
    if let Some(at) = marked.windows(6).position(|w| w == b"MARKER") {
        let mut bad = marked.clone();
        bad[at..at + 3].copy_from_slice(&[0xff, 0xfe, 0xc0]);
        cases.push(("invalid UTF-8", frame(&bad), Expect::Malformed));
    }
    cases
}

/// Cases for particular RPCs: deep JSON values and documents, huge contexts, huge strings.
fn special_cases(rpc: &Rpc) -> Vec<(&'static str, Vec<u8>, Expect)> {
    let name = rpc.path.rsplit('/').next().unwrap();
    // Real writes, not dry runs: whatever is refused must not be stored.
    let json_write = |value: prost_types::Value| -> Vec<u8> {
        let key = if name == "UpdateFlag" { "f" } else { "deep" };
        let flag = json_flag("demo", key, value);
        match name {
            "CreateFlag" => pb::CreateFlagRequest {
                flag: Some(flag),
                options: None,
            }
            .encode_to_vec(),
            "UpdateFlag" => pb::UpdateFlagRequest {
                flag: Some(flag),
                expected_revision: 0,
                options: None,
            }
            .encode_to_vec(),
            _ => pb::ImportNamespaceRequest {
                namespace: "demo".into(),
                source: Some(pb::import_namespace_request::Source::Bundle(
                    pb::NamespaceBundle {
                        namespace: Some(pb::Namespace {
                            key: "demo".into(),
                            ..Default::default()
                        }),
                        flags: vec![flag],
                        segments: vec![],
                    },
                )),
                options: None,
            }
            .encode_to_vec(),
        }
    };
    let mut cases = Vec::new();
    match name {
        "CreateFlag" | "UpdateFlag" | "ImportNamespace" => {
            // One level past the documented limit: CreateFlag and UpdateFlag refuse it with
            // INVALID_ARGUMENT; in ImportNamespace's bundle (one message deeper) it is already
            // past what the request decoder takes (prost allows 100 nested messages; a JSON
            // object level costs 3), so it is refused as undecodable there.
            let limit = flagstream::validate::MAX_JSON_DEPTH;
            cases.push((
                "JSON one level past the limit",
                frame(&(json_write(deep_json(limit + 1)))),
                Expect::Malformed,
            ));
            cases.push((
                "JSON 200 levels deep",
                frame(&(json_write(deep_json(200)))),
                Expect::Malformed,
            ));
            let mut long = flag("demo", "long");
            long.description = "d".repeat(3 << 20);
            if name == "CreateFlag" {
                cases.push((
                    "3 MiB description",
                    frame(
                        &pb::CreateFlagRequest {
                            flag: Some(long),
                            options: None,
                        }
                        .encode_to_vec(),
                    ),
                    Expect::Refused,
                ));
            }
            if name == "ImportNamespace" {
                let deep = "[".repeat(100_000) + &"]".repeat(100_000);
                let request = pb::ImportNamespaceRequest {
                    namespace: "demo".into(),
                    source: Some(pb::import_namespace_request::Source::UnleashJson(deep)),
                    options: None,
                };
                cases.push((
                    "Unleash JSON 100,000 arrays deep",
                    frame(&request.encode_to_vec()),
                    Expect::Refused,
                ));
                let bad = "{\"features\": [ {\"name\": \"x\", \"enabled\": tru";
                let request = pb::ImportNamespaceRequest {
                    namespace: "demo".into(),
                    source: Some(pb::import_namespace_request::Source::UnleashJson(
                        bad.into(),
                    )),
                    options: None,
                };
                cases.push((
                    "truncated Unleash JSON",
                    frame(&request.encode_to_vec()),
                    Expect::Refused,
                ));
            }
        }
        "Evaluate" | "EvaluateBatch" | "EvaluateAll" | "Watch" => {
            for (case, context) in [
                ("10,000 context properties", huge_context(10_000, 8)),
                ("a 1 MiB context property", huge_context(1, 1 << 20)),
            ] {
                let body = match name {
                    "Evaluate" => pb::EvaluateRequest {
                        namespace: "demo".into(),
                        flag_key: "f".into(),
                        context,
                        ..Default::default()
                    }
                    .encode_to_vec(),
                    "EvaluateBatch" => pb::EvaluateBatchRequest {
                        namespace: "demo".into(),
                        flag_keys: vec!["f".into()],
                        context,
                        min_revision: 0,
                    }
                    .encode_to_vec(),
                    "EvaluateAll" => pb::EvaluateAllRequest {
                        namespace: "demo".into(),
                        context,
                        min_revision: 0,
                    }
                    .encode_to_vec(),
                    _ => pb::WatchRequest {
                        namespace: "demo".into(),
                        context,
                        flag_keys: vec!["f".into()],
                    }
                    .encode_to_vec(),
                };
                cases.push((case, frame(&body), Expect::Refused));
            }
            if name == "EvaluateBatch" {
                let body = pb::EvaluateBatchRequest {
                    namespace: "demo".into(),
                    flag_keys: (0..100_000).map(|i| format!("k{i}")).collect(),
                    context: context("u"),
                    min_revision: 0,
                };
                cases.push((
                    "100,000 keys",
                    frame(&body.encode_to_vec()),
                    Expect::Refused,
                ));
            }
        }
        _ => {}
    }
    cases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_every_rpc() {
    let started = std::time::Instant::now();
    let dir = Dir::new("bad-input");
    let mut servers = Servers::start(&dir).await;
    let token = |kind: Kind| match kind {
        Kind::AdminWrite | Kind::AdminRead => ADMIN,
        Kind::Sync => SYNC,
        Kind::Eval | Kind::EvalWhole => EVAL,
    };
    let mut failures = Vec::new();
    let mut cases_run = 0;
    for rpc in rpcs() {
        let authorization = format!("Bearer {}", token(rpc.kind));
        // The valid request first: the table's requests are themselves right.
        let valid = frame(&(rpc.request)("demo", "f"));
        if let Err(why) = servers
            .check(&rpc, "valid", Some(&authorization), valid, Expect::Allowed)
            .await
        {
            failures.push(why);
        }
        for (case, body, expect) in common_cases(&rpc).into_iter().chain(special_cases(&rpc)) {
            cases_run += 1;
            if let Err(why) = servers
                .check(&rpc, case, Some(&authorization), body, expect)
                .await
            {
                failures.push(why);
            }
        }
        // A 10 KB value where a key goes: whatever the answer, its message quotes a short prefix
        // of it, not all of it (a default gRPC client refuses a status over 8 KiB of headers).
        cases_run += 1;
        let long = frame(&(rpc.request)("demo", &"k".repeat(10_000)));
        match servers
            .check(
                &rpc,
                "10 KB key",
                Some(&authorization),
                long,
                Expect::Allowed,
            )
            .await
        {
            Ok(outcome) if outcome.message.len() > MAX_ECHO => failures.push(format!(
                "{} [10 KB key]: a {}-byte message: {:?}",
                rpc.path,
                outcome.message.len(),
                short(&outcome.message)
            )),
            Ok(_) => {}
            Err(why) => failures.push(why),
        }
    }
    let count = |what: &str| failures.iter().filter(|f| f.contains(what)).count();
    println!(
        "faults: bad input: rpcs={} cases={cases_run} failures={} unknown={} died={} head_moved={} run_s={:.1}",
        rpcs().len(),
        failures.len(),
        count("answered UNKNOWN"),
        count("died"),
        count("head moved"),
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} failures, the first 20: {:#?}",
        failures.len(),
        &failures[..failures.len().min(20)]
    );
}

/// The credentials the matrix tries.
#[derive(Clone, Copy, Debug)]
enum Who {
    Nobody,
    UnknownToken,
    BasicScheme,
    EmptyBearer,
    Admin,
    AdminRead,
    Sync,
    Eval,
    EvalDemoOnly,
}

impl Who {
    fn header(self, scheme: &str) -> Option<String> {
        let secret = match self {
            Who::Nobody => return None,
            Who::UnknownToken => "not-a-known-secret-0123456789",
            Who::BasicScheme => return Some(format!("Basic {ADMIN}")),
            Who::EmptyBearer => return Some(format!("{scheme} ")),
            Who::Admin => ADMIN,
            Who::AdminRead => ADMIN_READ,
            Who::Sync => SYNC,
            Who::Eval => EVAL,
            Who::EvalDemoOnly => EVAL_DEMO,
        };
        Some(format!("{scheme} {secret}"))
    }
}

/// The expected answer to `who` calling an RPC of `kind` on namespace `ns`.
fn expected(kind: Kind, who: Who, ns: &str) -> Expect {
    use Expect::*;
    use Kind::*;
    match (who, kind) {
        (Who::Nobody | Who::UnknownToken | Who::BasicScheme | Who::EmptyBearer, _) => {
            Code(UNAUTHENTICATED)
        }
        (Who::Admin, AdminWrite | AdminRead) => Allowed,
        (Who::AdminRead, AdminRead) => Allowed,
        (Who::Sync, Sync) => Allowed,
        (Who::Eval, Eval) => Allowed,
        (Who::EvalDemoOnly, Eval) if ns == "demo" => Allowed,
        (Who::Eval | Who::Sync, EvalWhole) => Allowed,
        _ => Code(PERMISSION_DENIED),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_matrix_on_every_rpc() {
    let started = std::time::Instant::now();
    let dir = Dir::new("auth");
    let mut servers = Servers::start(&dir).await;
    let everyone = [
        Who::Nobody,
        Who::UnknownToken,
        Who::BasicScheme,
        Who::EmptyBearer,
        Who::Admin,
        Who::AdminRead,
        Who::Sync,
        Who::Eval,
        Who::EvalDemoOnly,
    ];
    let mut failures = Vec::new();
    let mut cells = 0;
    for rpc in rpcs() {
        for ns in ["demo", "other"] {
            for who in everyone {
                // The scheme is case-insensitive (RFC 7235, section 2.1): `bearer` and `BEARER`
                // mean `Bearer`. Tried on one namespace, with the tokens whose answer depends
                // on it.
                let schemes: &[&str] = match who {
                    Who::Nobody | Who::BasicScheme => &["Bearer"],
                    _ if ns == "demo" => &["Bearer", "bearer", "BEARER"],
                    _ => &["Bearer"],
                };
                for scheme in schemes {
                    cells += 1;
                    let case = format!("{who:?} as `{scheme}` on {ns}");
                    let body = frame(&(rpc.request)(ns, "f"));
                    let header = who.header(scheme);
                    if let Err(why) = servers
                        .check(
                            &rpc,
                            &case,
                            header.as_deref(),
                            body,
                            expected(rpc.kind, who, ns),
                        )
                        .await
                    {
                        failures.push(why);
                    }
                }
            }
        }
    }
    println!(
        "faults: auth matrix: rpcs={} cells={cells} failures={} run_s={:.1}",
        rpcs().len(),
        failures.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} failures, the first 20: {:#?}",
        failures.len(),
        &failures[..failures.len().min(20)]
    );
}
