//! Test support: a fake flagwrite Replication server fed by channels (each subscription hands
//! the test its request and a sender for the stream), and builders for replicated objects.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use flagread::{Config, Handles};
use flagstream::model;
use flagstream::pb;
use flagstream::pb::flag_eval_client::FlagEvalClient;
use flagstream::pb::replication_server::{Replication, ReplicationServer};
use flagstream::pb::sync_message::Kind;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// One subscription the fake upstream received.
pub struct Subscription {
    /// What the replica asked for.
    pub request: pb::SubscribeRequest,
    /// The `authorization` metadata it sent.
    pub authorization: Option<String>,
    /// Feeds the stream; dropping it ends the stream.
    pub tx: mpsc::Sender<Result<pb::SyncMessage, Status>>,
}

/// The fake upstream: a Replication server on 127.0.0.1:0.
pub struct FakeUpstream {
    /// Its address, as `http://127.0.0.1:port`.
    pub url: String,
    /// Subscriptions in the order they arrive.
    pub subscriptions: mpsc::Receiver<Subscription>,
    /// Stops the server when dropped.
    _stop: tokio::sync::oneshot::Sender<()>,
}

struct Fake {
    subscriptions: mpsc::Sender<Subscription>,
}

#[tonic::async_trait]
impl Replication for Fake {
    type SubscribeStream = ReceiverStream<Result<pb::SyncMessage, Status>>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let (tx, rx) = mpsc::channel(1024);
        let subscription = Subscription {
            request: request.into_inner(),
            authorization,
            tx,
        };
        self.subscriptions
            .send(subscription)
            .await
            .map_err(|_| Status::unavailable("test over"))?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

impl FakeUpstream {
    /// Starts the fake on an ephemeral loopback port.
    pub async fn start() -> FakeUpstream {
        FakeUpstream::start_with(None).await
    }

    /// Starts the fake, serving TLS when `tls` is given (its URL is then `https://`).
    pub async fn start_with(tls: Option<tonic::transport::ServerTlsConfig>) -> FakeUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let (subs_tx, subscriptions) = mpsc::channel(16);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            server = server.tls_config(tls).unwrap();
        }
        tokio::spawn(
            server
                .add_service(ReplicationServer::new(Fake {
                    subscriptions: subs_tx,
                }))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                ),
        );
        FakeUpstream {
            url: format!("{scheme}://{addr}"),
            subscriptions,
            _stop: stop,
        }
    }

    /// The next subscription (fails the test after 10 s).
    pub async fn next(&mut self) -> Subscription {
        tokio::time::timeout(Duration::from_secs(10), self.subscriptions.recv())
            .await
            .expect("a subscription within 10 s")
            .expect("the fake is running")
    }
}

impl Subscription {
    /// Sends messages down the stream.
    pub async fn send(&self, messages: impl IntoIterator<Item = pb::SyncMessage>) {
        for message in messages {
            self.tx
                .send(Ok(message))
                .await
                .expect("the replica is subscribed");
        }
    }
}

/// A boolean flag `key` of namespace `ns`, on, serving `on` (variants `on`/`off`), stamped `rev`.
pub fn flag(ns: &str, key: &str, rev: u64) -> model::Flag {
    let variant = |name: &str, value: bool| model::Variant {
        name: name.to_string(),
        value: model::Value::Bool(value),
        description: String::new(),
    };
    model::Flag {
        namespace: ns.to_string(),
        key: key.to_string(),
        description: String::new(),
        flag_type: model::FlagType::Boolean,
        variants: vec![variant("on", true), variant("off", false)],
        enabled: true,
        disabled_variant: "off".to_string(),
        default_variant: "on".to_string(),
        rules: vec![],
        prerequisites: vec![],
        tags: vec![],
        metadata: [("owner".to_string(), "team-a".to_string())]
            .into_iter()
            .collect(),
        stamp: model::Stamp {
            created_revision: rev,
            updated_revision: rev,
            updated_at_ms: 0,
            updated_by: "test".into(),
        },
    }
}

/// A flag of namespace `ns` with two variants `a` and `b` of `values`, serving `a`.
pub fn typed(ns: &str, key: &str, values: [model::Value; 2]) -> model::Flag {
    let mut flag = flag(ns, key, 2);
    flag.flag_type = values[0].flag_type();
    flag.variants = ["a", "b"]
        .into_iter()
        .zip(values)
        .map(|(name, value)| model::Variant {
            name: name.into(),
            value,
            description: String::new(),
        })
        .collect();
    flag.default_variant = "a".into();
    flag.disabled_variant = "b".into();
    flag
}

/// A rule serving `variant` when property `plan` is `pro`.
pub fn pro_rule(variant: &str) -> model::Rule {
    model::Rule {
        name: "pro".into(),
        constraints: vec![model::Constraint {
            attribute: model::Attribute::Property("plan".into()),
            operator: model::Operator::In,
            values: vec!["pro".into()],
            inverted: false,
            case_insensitive: false,
        }],
        segments: vec![],
        rollout: None,
        serve: model::Serve::Variant(variant.into()),
    }
}

/// Boolean flags of namespace `ns` reaching every reason: `on` (no rules), `off` (disabled),
/// `targeted` (rule on plan `pro`, else `off`), `child` (prerequisite `off`: fails), `guarded`
/// (prerequisite `on`: holds, no rules) and `bad` (a rule naming a missing variant).
pub fn reason_flags(ns: &str) -> Vec<model::Flag> {
    let mut off = flag(ns, "off", 2);
    off.enabled = false;
    let mut targeted = flag(ns, "targeted", 2);
    targeted.default_variant = "off".into();
    targeted.rules = vec![pro_rule("on")];
    let prerequisite = |parent: &str| model::Prerequisite {
        flag: parent.into(),
        expect_off: false,
        variants: vec![],
    };
    let mut child = flag(ns, "child", 2);
    child.prerequisites = vec![prerequisite("off")];
    let mut guarded = flag(ns, "guarded", 2);
    guarded.prerequisites = vec![prerequisite("on")];
    let mut bad = flag(ns, "bad", 2);
    bad.rules = vec![pro_rule("missing-variant")];
    vec![flag(ns, "on", 2), off, targeted, child, guarded, bad]
}

/// A namespace record.
pub fn namespace(key: &str) -> pb::Namespace {
    pb::Namespace {
        key: key.to_string(),
        description: String::new(),
        stamp: None,
    }
}

/// A whole snapshot at `revision` holding `flags` (their namespaces included).
pub fn snapshot(revision: u64, flags: Vec<model::Flag>) -> Vec<pb::SyncMessage> {
    let mut namespaces: Vec<String> = flags.iter().map(|f| f.namespace.clone()).collect();
    namespaces.sort();
    namespaces.dedup();
    vec![
        message(Kind::SnapshotBegin(pb::SnapshotBegin {
            revision,
            history_id: HISTORY.into(),
            chain: chain(revision),
            namespaces: vec![],
        })),
        message(Kind::SnapshotChunk(pb::SnapshotChunk {
            namespaces: namespaces.iter().map(|n| namespace(n)).collect(),
            flags: flags.into_iter().map(pb::Flag::from).collect(),
            segments: vec![],
        })),
        message(Kind::SnapshotEnd(pb::SnapshotEnd { revision })),
    ]
}

/// A change at `revision` putting `flags`.
pub fn put(revision: u64, flags: Vec<model::Flag>) -> pb::SyncMessage {
    let deltas = flags
        .into_iter()
        .map(|f| pb::Delta {
            kind: Some(pb::delta::Kind::PutFlag(f.into())),
        })
        .collect();
    message(Kind::Change(pb::Change {
        revision,
        time: None,
        deltas,
        chain: chain(revision),
    }))
}

/// The fake writer's history identity.
pub const HISTORY: &str = "fake-history";

/// The fake writer's history position at `revision` (one linear history).
pub fn chain(revision: u64) -> Vec<u8> {
    flagstream::digest::origin(HISTORY, revision)
}

/// A change at `revision` deleting flag `key` of `ns`.
pub fn delete(revision: u64, ns: &str, key: &str) -> pb::SyncMessage {
    let r = pb::ObjectRef {
        namespace: ns.to_string(),
        key: key.to_string(),
    };
    message(Kind::Change(pb::Change {
        revision,
        time: None,
        deltas: vec![pb::Delta {
            kind: Some(pb::delta::Kind::DeleteFlag(r)),
        }],
        chain: chain(revision),
    }))
}

/// A heartbeat naming the writer's head.
pub fn heartbeat(head_revision: u64) -> pb::SyncMessage {
    message(Kind::Heartbeat(pb::Heartbeat {
        head_revision,
        time: None,
        history_id: HISTORY.into(),
        silence_ms: 0,
    }))
}

pub fn message(kind: Kind) -> pb::SyncMessage {
    pb::SyncMessage { kind: Some(kind) }
}

/// Waits (up to 10 s) until `cond` holds, polling every 5 ms.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits (up to 10 s) until the async `cond` holds, polling every 20 ms.
pub async fn eventually_async<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A replica running in this process (`flagread::run_with` on 127.0.0.1:0).
pub struct Replica {
    /// `http://127.0.0.1:port`.
    pub url: String,
    /// What the replica exposes from inside.
    pub handles: Handles,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), flagread::Error>>,
}

impl Replica {
    pub async fn start(config: Config) -> Replica {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (handles_tx, handles_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(flagread::run_with(
            listener,
            config,
            async {
                let _ = stopped.await;
            },
            move |handles| {
                let _ = handles_tx.send(handles);
            },
        ));
        let handles = handles_rx.await.expect("the replica starts");
        Replica {
            url,
            handles,
            stop: Some(stop),
            task,
        }
    }

    pub async fn client(&self) -> FlagEvalClient<Channel> {
        FlagEvalClient::connect(self.url.clone()).await.unwrap()
    }

    pub async fn health(&self) -> ServingStatus {
        self.health_of("flagstream.v1.FlagEval").await
    }

    pub async fn health_of(&self, service: &str) -> ServingStatus {
        let channel = Channel::from_shared(self.url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = HealthClient::new(channel);
        let request = tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        };
        ServingStatus::try_from(health.check(request).await.unwrap().into_inner().status).unwrap()
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the replica drains within 10 s")
            .unwrap()
            .unwrap();
    }
}

/// A fresh temporary directory for one test.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "flagread-{name}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
