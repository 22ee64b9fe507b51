//! Shared helpers of flagwrite's integration tests: a real server on
//! 127.0.0.1:0 over a fresh data directory, authenticated clients, and
//! builders for valid objects.
#![allow(dead_code)]

pub mod process;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flagstream::pb;
use flagstream::pb::flag_admin_client::FlagAdminClient;
use flagstream::pb::replication_client::ReplicationClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub const ADMIN: &str = "admin-secret-0123456789";
pub const READER: &str = "reader-secret-0123456789";
pub const SYNC: &str = "sync-secret-0123456789";
pub const EVAL: &str = "eval-secret-0123456789";

/// The tokens file every test server uses.
pub const TOKENS: &str = "\
# name   scopes      secret
ops      admin       admin-secret-0123456789
viewer   admin-read  reader-secret-0123456789
replica  sync        sync-secret-0123456789
web      eval        eval-secret-0123456789
";

/// A running flagwrite on a fresh data directory; stops (and removes the
/// directory) when dropped.
pub struct Server {
    pub addr: std::net::SocketAddr,
    pub dir: TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), flagwrite::RunError>>>,
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

/// Adds `authorization: Bearer <token>` to every call (nothing when `None`).
#[derive(Clone)]
pub struct Bearer(pub Option<&'static str>);

pub type Admin = FlagAdminClient<InterceptedService<Channel, Bearer>>;
pub type Sync = ReplicationClient<InterceptedService<Channel, Bearer>>;

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = self.0 {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        Ok(request)
    }
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "flagwrite-test-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A configuration for tests: auth from [`TOKENS`], no metrics endpoint,
/// fast heartbeats.
pub fn config(dir: &TempDir) -> flagwrite::Config {
    let tokens = dir.0.join("tokens");
    std::fs::write(&tokens, TOKENS).unwrap();
    flagwrite::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.0.join("data"),
        tokens_file: Some(tokens),
        tls_cert: None,
        tls_key: None,
        tls_client_ca: None,
        changelog_retention: 0,
        metrics_listen: None,
        log_format: flagstream::kit::telemetry::LogFormat::Text,
        dev_no_auth: false,
        heartbeat_ms: 200,
        feed_capacity: 4096,
        max_subscribers: 4096,
        shutdown_grace_secs: 5,
        keepalive_s: 20,
        keepalive_timeout_s: 10,
    }
}

impl Server {
    /// Starts a server with the default test configuration.
    pub async fn start() -> Server {
        Server::start_with(|_| {}).await
    }

    /// Starts a server after `adjust` changed the test configuration.
    pub async fn start_with(adjust: impl FnOnce(&mut flagwrite::Config)) -> Server {
        Server::start_in(TempDir::new("srv"), adjust).await
    }

    /// Starts a server on the data in `dir` (e.g. one a stopped server left).
    pub async fn start_in(dir: TempDir, adjust: impl FnOnce(&mut flagwrite::Config)) -> Server {
        let mut config = config(&dir);
        adjust(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(flagwrite::run(listener, config, async {
            let _ = stopped.await;
        }));
        Server {
            addr,
            dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn channel(&self) -> Channel {
        let endpoint = Channel::from_shared(format!("http://{}", self.addr)).unwrap();
        for _ in 0..100 {
            if let Ok(channel) = endpoint.connect().await {
                return channel;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("server on {} did not come up", self.addr);
    }

    pub async fn admin(&self, token: Option<&'static str>) -> Admin {
        FlagAdminClient::with_interceptor(self.channel().await, Bearer(token))
    }

    pub async fn sync(&self, token: Option<&'static str>) -> Sync {
        ReplicationClient::with_interceptor(self.channel().await, Bearer(token))
    }

    /// Stops the server and waits for it to finish.
    pub async fn stop(self) {
        self.stop_keeping_data().await;
    }

    /// Stops the server, waits for it to finish and hands back its data.
    pub async fn stop_keeping_data(mut self) -> TempDir {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
        std::mem::replace(&mut self.dir, TempDir(PathBuf::new()))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub fn namespace(key: &str) -> pb::Namespace {
    pb::Namespace {
        key: key.into(),
        description: format!("the {key} namespace"),
        stamp: None,
    }
}

pub fn bool_value(b: bool) -> Option<pb::TypedValue> {
    Some(pb::TypedValue {
        kind: Some(pb::typed_value::Kind::BoolValue(b)),
    })
}

/// A valid boolean flag with variants `on` and `off`.
pub fn flag(namespace: &str, key: &str) -> pb::Flag {
    pb::Flag {
        namespace: namespace.into(),
        key: key.into(),
        description: "a test flag".into(),
        r#type: pb::FlagType::Boolean as i32,
        variants: vec![
            pb::Variant {
                name: "on".into(),
                value: bool_value(true),
                description: String::new(),
            },
            pb::Variant {
                name: "off".into(),
                value: bool_value(false),
                description: String::new(),
            },
        ],
        enabled: true,
        disabled_variant: "off".into(),
        default_variant: "off".into(),
        tags: vec!["test".into()],
        ..Default::default()
    }
}

/// A rule serving `on` to users in `segment`.
pub fn segment_rule(segment: &str) -> pb::Rule {
    pb::Rule {
        name: format!("in {segment}"),
        segments: vec![segment.into()],
        serve: Some(pb::Serve {
            kind: Some(pb::serve::Kind::Variant("on".into())),
        }),
        ..Default::default()
    }
}

/// A valid segment of users whose `plan` property is `pro`.
pub fn segment(namespace: &str, key: &str) -> pb::Segment {
    pb::Segment {
        namespace: namespace.into(),
        key: key.into(),
        description: "pro users".into(),
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

pub fn options(comment: &str) -> Option<pb::WriteOptions> {
    Some(pb::WriteOptions {
        validate_only: false,
        comment: comment.into(),
    })
}

/// Creates a namespace and returns its revision.
pub async fn create_namespace(admin: &mut Admin, key: &str) -> u64 {
    admin
        .create_namespace(pb::CreateNamespaceRequest {
            namespace: Some(namespace(key)),
            options: options("test"),
        })
        .await
        .unwrap()
        .into_inner()
        .revision
}

/// Creates a flag and returns its revision.
pub async fn create_flag(admin: &mut Admin, flag: pb::Flag) -> u64 {
    admin
        .create_flag(pb::CreateFlagRequest {
            flag: Some(flag),
            options: options("test"),
        })
        .await
        .unwrap()
        .into_inner()
        .revision
}

/// Replaces a flag (any revision) and returns the write's revision.
pub async fn update_flag(admin: &mut Admin, flag: pb::Flag) -> u64 {
    admin
        .update_flag(pb::UpdateFlagRequest {
            flag: Some(flag),
            expected_revision: 0,
            options: options("test"),
        })
        .await
        .unwrap()
        .into_inner()
        .revision
}
