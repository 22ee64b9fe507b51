//! flagread: a FlagEval replica. It follows flagwrite's change stream into an in-memory state
//! and evaluates flags from it, never waiting on a lock and never serving half a change.
//!
//! # Layout
//! - [`state`]: the replica state (compiled flag sets per namespace behind `arc-swap`), applying
//!   snapshots and changes, the applied-revision `watch` and the change `broadcast`.
//! - [`follower`]: the background task that subscribes to the writer, applies what arrives and
//!   reconnects with jittered exponential backoff.
//! - [`wire`]: replication messages into the model, and the snapshot file.
//! - [`service`]: the FlagEval gRPC service.
//! - [`openfeature`]: what the OpenFeature front ends share (namespace selection, anonymous
//!   access, the context mapping, OpenFeature's reasons); [`flagd`]: flagd's evaluation
//!   protocol on the gRPC port; [`ofrep`]: OFREP on its own HTTP/1.1 port.
//! - [`relay`]: replica chaining: the Replication stream served from this replica's state
//!   (`--serve-replication`), through `flagstream::kit::replication`.
//! - [`metrics`]: Prometheus metrics of the replica.
//! - [`run`]: wires it all together on a bound listener; `main` only parses [`Config`], sets up
//!   tracing, binds and calls it, and so do the tests.
#![forbid(unsafe_code)]

pub mod flagd;
pub mod follower;
pub mod holds;
pub mod metrics;
pub mod ofrep;
pub mod openfeature;
pub mod relay;
pub mod service;
pub mod state;
pub mod wire;

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flagstream::kit;
use flagstream::kit::auth::{Authenticator, Tokens, TokensError};
use flagstream::kit::grpc::TlsError;
use flagstream::kit::rpc_metrics::RpcMetricsLayer;
use flagstream::kit::telemetry::LogFormat;
use flagstream::pb::flag_eval_server::FlagEvalServer;
use flagstream::pb::flagd::v1::service_server as flagd_v1;
use flagstream::pb::flagd::v2::service_server as flagd_v2;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server};
use tonic_health::ServingStatus;

use crate::follower::{Backoff, SyncStatus, Upstream};
use crate::metrics::Metrics;
use crate::service::EvalService;
use crate::state::State;

/// flagread's configuration: every option is a flag and a `FLAGREAD_<NAME>` environment
/// variable. Built (and checked with [`Config::check`]) before anything is bound.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "flagread",
    version,
    about = "flagstream FlagEval replica: follows flagwrite, evaluates flags from memory"
)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "FLAGREAD_LISTEN", default_value = "0.0.0.0:50052")]
    pub listen: SocketAddr,
    /// The flagwrite endpoint to follow, e.g. `http://flagwrite:50051` (`https://` for TLS).
    #[arg(
        long,
        env = "FLAGREAD_UPSTREAM",
        default_value = "http://127.0.0.1:50051"
    )]
    pub upstream: String,
    /// Bearer token of scope `sync` presented to flagwrite.
    #[arg(long, env = "FLAGREAD_SYNC_TOKEN", hide_env_values = true)]
    pub sync_token: Option<String>,
    /// Namespaces to serve, comma-separated; empty serves every namespace.
    #[arg(long, env = "FLAGREAD_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,
    /// Tokens file for FlagEval callers (scope `eval` or `eval:<namespace>`; see kit::auth).
    #[arg(long, env = "FLAGREAD_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// Where to keep the last full state, so the replica can start while the writer is down.
    #[arg(long, env = "FLAGREAD_SNAPSHOT_FILE")]
    pub snapshot_file: Option<PathBuf>,
    /// Least time between two snapshot file writes, in milliseconds. Each write encodes the
    /// whole state, so keep it well above the time that takes for large states.
    #[arg(long, env = "FLAGREAD_SNAPSHOT_INTERVAL_MS", default_value_t = 5000)]
    pub snapshot_interval_ms: u64,
    /// PEM certificate chain of this server (TLS with `--tls-key`).
    #[arg(long, env = "FLAGREAD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of this server.
    #[arg(long, env = "FLAGREAD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA whose client certificates this server requires.
    #[arg(long, env = "FLAGREAD_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// PEM CA that signed flagwrite's certificate (for an `https://` upstream).
    #[arg(long, env = "FLAGREAD_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,
    /// Server name expected in flagwrite's certificate (default: the upstream host).
    #[arg(long, env = "FLAGREAD_UPSTREAM_DOMAIN")]
    pub upstream_domain: Option<String>,
    /// PEM client certificate chain presented to flagwrite (with `--upstream-key`), for a
    /// writer that requires client certificates (`--tls-client-ca` there).
    #[arg(long, env = "FLAGREAD_UPSTREAM_CERT", requires = "upstream_key")]
    pub upstream_cert: Option<PathBuf>,
    /// PEM private key of `--upstream-cert`.
    #[arg(long, env = "FLAGREAD_UPSTREAM_KEY", requires = "upstream_cert")]
    pub upstream_key: Option<PathBuf>,
    /// Address of the Prometheus `/metrics` endpoint.
    #[arg(long, env = "FLAGREAD_METRICS_LISTEN", default_value = "0.0.0.0:9092")]
    pub metrics_listen: SocketAddr,
    /// Log format: `text` or `json`.
    #[arg(long, env = "FLAGREAD_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    /// Development only: serve FlagEval without tokens.
    #[arg(long, env = "FLAGREAD_DEV_NO_AUTH")]
    pub dev_no_auth: bool,
    /// Unary calls in flight beyond which calls are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "FLAGREAD_CONCURRENCY_LIMIT", default_value_t = 10_000)]
    pub concurrency_limit: usize,
    /// `min_revision` waits open at once on the replica; beyond, calls that would wait are
    /// refused with RESOURCE_EXHAUSTED. Waits hold no concurrency permit.
    #[arg(long, env = "FLAGREAD_MAX_REVISION_WAITS", default_value_t = 10_000)]
    pub max_revision_waits: usize,
    /// `min_revision` waits open at once per token.
    #[arg(
        long,
        env = "FLAGREAD_MAX_REVISION_WAITS_PER_TOKEN",
        default_value_t = 1_000
    )]
    pub max_revision_waits_per_token: usize,
    /// How long, in milliseconds, a `min_revision` beyond the writer's head (as last heard)
    /// waits for news of that revision before it is refused with OUT_OF_RANGE.
    #[arg(long, env = "FLAGREAD_REVISION_HORIZON_MS", default_value_t = 1_000)]
    pub revision_horizon_ms: u64,
    /// `Watch` streams open at once on the replica; beyond, RESOURCE_EXHAUSTED.
    #[arg(long, env = "FLAGREAD_MAX_WATCH_STREAMS", default_value_t = 10_000)]
    pub max_watch_streams: usize,
    /// `Watch` streams open at once per token.
    #[arg(
        long,
        env = "FLAGREAD_MAX_WATCH_STREAMS_PER_TOKEN",
        default_value_t = 1_000
    )]
    pub max_watch_streams_per_token: usize,
    /// HTTP/2 streams per connection.
    #[arg(long, env = "FLAGREAD_MAX_CONCURRENT_STREAMS", default_value_t = 1024)]
    pub max_concurrent_streams: u32,
    /// Gather a connection's writes of large answers (16 KiB and up) into fewer socket
    /// writes (`flagstream::kit::coalesce`); `false` writes them as h2 frames them.
    #[arg(
        long,
        env = "FLAGREAD_COALESCE_WRITES",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub coalesce_writes: bool,
    /// Connections are closed (gracefully) after this many seconds, so clients rebalance onto
    /// new replicas.
    #[arg(long, env = "FLAGREAD_MAX_CONNECTION_AGE_S", default_value_t = 300)]
    pub max_connection_age_s: u64,
    /// Time given to calls in flight on a connection past its maximum age, in seconds.
    #[arg(
        long,
        env = "FLAGREAD_MAX_CONNECTION_AGE_GRACE_S",
        default_value_t = 30
    )]
    pub max_connection_age_grace_s: u64,
    /// HTTP/2 keepalive ping interval, in seconds (server and upstream).
    #[arg(long, env = "FLAGREAD_KEEPALIVE_S", default_value_t = 20)]
    pub keepalive_s: u64,
    /// Reconnect when the writer has sent nothing (not even a heartbeat) for this many seconds.
    #[arg(long, env = "FLAGREAD_UPSTREAM_SILENCE_S", default_value_t = 30)]
    pub upstream_silence_s: u64,
    /// First reconnection delay in milliseconds (doubles per failure, jittered).
    #[arg(long, env = "FLAGREAD_BACKOFF_MIN_MS", default_value_t = 100)]
    pub backoff_min_ms: u64,
    /// Largest reconnection delay in milliseconds.
    #[arg(long, env = "FLAGREAD_BACKOFF_MAX_MS", default_value_t = 5000)]
    pub backoff_max_ms: u64,
    /// Longest drain at shutdown, in seconds (keep it below the pod's termination grace): calls
    /// in flight and the background tasks' last work (the snapshot file) share it.
    #[arg(long, env = "FLAGREAD_DRAIN_S", default_value_t = 20)]
    pub drain_s: u64,
    /// The namespace flagd-protocol and OFREP calls read when they name none (no
    /// `flagd-selector` header).
    #[arg(
        long,
        env = "FLAGREAD_FLAGD_DEFAULT_NAMESPACE",
        default_value = "default"
    )]
    pub flagd_default_namespace: String,
    /// Namespaces flagd-protocol and OFREP callers may read without a token, comma-separated
    /// (for providers that cannot send an `authorization` header). FlagEval always needs one.
    #[arg(long, env = "FLAGREAD_ANONYMOUS_NAMESPACES", value_delimiter = ',')]
    pub anonymous_namespaces: Vec<String>,
    /// Seconds of silence after which a flagd `EventStream` gets a `keep_alive` event.
    #[arg(long, env = "FLAGREAD_FLAGD_KEEPALIVE_S", default_value_t = 20)]
    pub flagd_keepalive_s: u64,
    /// Address of the OFREP (OpenFeature Remote Evaluation Protocol) HTTP server.
    #[arg(long, env = "FLAGREAD_OFREP_LISTEN", default_value = "0.0.0.0:8016")]
    pub ofrep_listen: SocketAddr,
    /// Browser origins allowed to call OFREP (CORS), comma-separated; `*` for any. Empty: no
    /// CORS headers, so browsers refuse cross-origin calls.
    #[arg(long, env = "FLAGREAD_OFREP_CORS_ORIGINS", value_delimiter = ',')]
    pub ofrep_cors_origins: Vec<String>,
    /// Namespaces whose evaluations are exported per flag and variant
    /// (`flagread_flag_evaluations_total`), comma-separated; `*` for all. Every namespace is
    /// always counted as a whole in `flagread_evaluations_total{namespace,reason}`.
    #[arg(long, env = "FLAGREAD_FLAG_METRICS_NAMESPACES", value_delimiter = ',')]
    pub flag_metrics_namespaces: Vec<String>,
    /// Most per-flag series in one scrape, over all opted-in namespaces; series past it (in
    /// namespace and flag order) are left out and counted in `flagread_flag_series_dropped`.
    #[arg(
        long,
        env = "FLAGREAD_FLAG_METRICS_MAX_SERIES",
        default_value_t = 10_000
    )]
    pub flag_metrics_max_series: usize,
    /// Also serve the Replication stream (`flagstream.v1.Replication`) on the gRPC port, from
    /// this replica's own state, so other replicas can follow this one (`--upstream` pointing
    /// here) instead of the writer. Followers need a token of scope `sync` in `--tokens-file`.
    #[arg(long, env = "FLAGREAD_SERVE_REPLICATION")]
    pub serve_replication: bool,
    /// Followers served at once with `--serve-replication`; more are refused with
    /// RESOURCE_EXHAUSTED (they retry with backoff).
    #[arg(long, env = "FLAGREAD_MAX_REPLICATION_STREAMS", default_value_t = 1024)]
    pub max_replication_streams: usize,
    /// Applied changes kept in memory with `--serve-replication`, for followers to resume from;
    /// a follower further behind gets a snapshot.
    #[arg(long, env = "FLAGREAD_REPLICATION_RETAIN", default_value_t = 4096)]
    pub replication_retain: usize,
    /// Milliseconds between heartbeats to followers while the upstream is silent (the writer's
    /// own heartbeats are passed on as they arrive).
    #[arg(
        long,
        env = "FLAGREAD_REPLICATION_HEARTBEAT_MS",
        default_value_t = 5000
    )]
    pub replication_heartbeat_ms: u64,
}

/// Why flagread could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// FlagEval would be open to anyone: a tokens file or `--dev-no-auth` is required.
    #[error("--tokens-file is required (or --dev-no-auth for development)")]
    NoAuth,
    /// Both a tokens file and `--dev-no-auth` were given; which one was meant is unclear.
    #[error("--tokens-file and --dev-no-auth exclude each other")]
    AuthConflict,
    /// The tokens file is unreadable or malformed.
    #[error(transparent)]
    Tokens(#[from] TokensError),
    /// A TLS file is unreadable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The upstream address or its TLS settings are invalid.
    #[error("upstream {0}")]
    Upstream(String),
    /// The snapshot file exists but cannot be read.
    #[error(transparent)]
    Snapshot(#[from] wire::WireError),
    /// A listener could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// An origin of `--ofrep-cors-origins` is not a valid header value.
    #[error("--ofrep-cors-origins: {0}")]
    Cors(String),
    /// The gRPC server failed.
    #[error("server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

impl Config {
    /// The configuration from the command line and environment.
    pub fn from_args() -> Config {
        <Config as clap::Parser>::parse()
    }

    /// A configuration for tests and benches: loopback, ephemeral metrics port, dev auth, short
    /// backoff; override fields as needed.
    pub fn local(upstream: impl Into<String>) -> Config {
        let mut config = <Config as clap::Parser>::parse_from(["flagread", "--dev-no-auth"]);
        config.upstream = upstream.into();
        config.listen = "127.0.0.1:0".parse().expect("a valid address");
        config.metrics_listen = "127.0.0.1:0".parse().expect("a valid address");
        config.ofrep_listen = "127.0.0.1:0".parse().expect("a valid address");
        config.backoff_min_ms = 20;
        config.backoff_max_ms = 500;
        config.drain_s = 5;
        config
    }

    /// Checks the options and reads the files they name (tokens, TLS), so bad configuration
    /// fails with one clear line before anything is bound.
    pub fn check(&self) -> Result<(), Error> {
        match (&self.tokens_file, self.dev_no_auth) {
            (None, false) => return Err(Error::NoAuth),
            (Some(_), true) => return Err(Error::AuthConflict),
            (Some(path), false) => {
                Tokens::load(path)?;
            }
            (None, true) => {}
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            kit::grpc::tls_config(cert, key, self.tls_client_ca.as_deref())?;
        }
        self.upstream_endpoint()?;
        ofrep::cors_layer(&self.ofrep_cors_origins).map_err(Error::Cors)?;
        Ok(())
    }

    /// The upstream endpoint with its timeouts, keepalive and TLS.
    fn upstream_endpoint(&self) -> Result<Endpoint, Error> {
        let mut endpoint = Endpoint::from_shared(self.upstream.clone())
            .map_err(|e| Error::Upstream(format!("{:?}: {e}", self.upstream)))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(self.keepalive_s.max(1)))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        if self.upstream.starts_with("https://")
            || self.upstream_ca.is_some()
            || self.upstream_cert.is_some()
        {
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = &self.upstream_ca {
                let pem = std::fs::read(ca)
                    .map_err(|e| Error::Upstream(format!("CA {}: {e}", ca.display())))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            if let (Some(cert), Some(key)) = (&self.upstream_cert, &self.upstream_key) {
                let read = |what: &str, path: &PathBuf| {
                    std::fs::read(path)
                        .map_err(|e| Error::Upstream(format!("{what} {}: {e}", path.display())))
                };
                tls = tls.identity(Identity::from_pem(
                    read("client certificate", cert)?,
                    read("client key", key)?,
                ));
            }
            if let Some(domain) = &self.upstream_domain {
                tls = tls.domain_name(domain.clone());
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| Error::Upstream(format!("TLS: {e}")))?;
        }
        Ok(endpoint)
    }
}

/// What a running replica exposes to an embedding test or bench.
pub struct Handles {
    /// The replica state.
    pub state: Arc<State>,
    /// What the follower knows about the writer.
    pub status: Arc<SyncStatus>,
    /// Where `/metrics` is served.
    pub metrics_listen: SocketAddr,
    /// Where OFREP is served.
    pub ofrep_listen: SocketAddr,
    /// The FlagEval service, for what its callers hold.
    pub eval: EvalService,
}

/// Runs a replica on `listener` until `shutdown` completes, then drains (bounded by
/// `config.drain_s`).
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    run_with(listener, config, shutdown, |_| {}).await
}

/// As [`run`], handing `started` the replica's state and status once everything is bound (for
/// tests and benches that watch the replica from inside).
pub async fn run_with(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
    started: impl FnOnce(Handles),
) -> Result<(), Error> {
    config.check()?;
    let authenticator = match &config.tokens_file {
        Some(path) if !config.dev_no_auth => Authenticator::new(Tokens::load(path)?),
        _ => Authenticator::allow_all(),
    };
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(kit::grpc::tls_config(
            cert,
            key,
            config.tls_client_ca.as_deref(),
        )?),
        _ => None,
    };
    let upstream = Upstream {
        endpoint: config.upstream_endpoint()?,
        token: config.sync_token.clone(),
        backoff: Backoff {
            min: Duration::from_millis(config.backoff_min_ms.max(1)),
            max: Duration::from_millis(config.backoff_max_ms.max(config.backoff_min_ms.max(1))),
        },
        silence: Duration::from_secs(config.upstream_silence_s.max(1)),
    };
    let filter = (!config.namespaces.is_empty())
        .then(|| config.namespaces.iter().cloned().collect::<BTreeSet<_>>());
    let state = Arc::new(State::new(filter));
    if let Some(path) = &config.snapshot_file {
        // A file that cannot serve this replica is passed over, loudly: the writer has the state.
        match wire::read_snapshot_file(path) {
            Ok(Some(snapshot)) => match snapshot_fits(&snapshot, state.filter()) {
                Ok(()) => {
                    let (revision, flags) = (snapshot.revision, snapshot.flags.len());
                    let loader = state.clone();
                    tokio::task::spawn_blocking(move || loader.install(snapshot))
                        .await
                        .map_err(|e| Error::Upstream(format!("loading the snapshot file: {e}")))?;
                    tracing::info!(revision, flags, path = %path.display(), "loaded the snapshot file");
                }
                Err(why) => {
                    tracing::warn!(path = %path.display(), %why, "not using the snapshot file; syncing from the writer")
                }
            },
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(%error, "cannot read the snapshot file; syncing from the writer")
            }
        }
    }
    let status = Arc::new(SyncStatus::new());
    let metrics = Arc::new(Metrics::default());
    let metrics_listener = TcpListener::bind(config.metrics_listen)
        .await
        .map_err(|source| Error::Bind {
            addr: config.metrics_listen,
            source,
        })?;
    let metrics_listen = metrics_listener
        .local_addr()
        .map_err(|source| Error::Bind {
            addr: config.metrics_listen,
            source,
        })?;
    let ofrep_listener = TcpListener::bind(config.ofrep_listen)
        .await
        .map_err(|source| Error::Bind {
            addr: config.ofrep_listen,
            source,
        })?;
    let ofrep_listen = ofrep_listener.local_addr().map_err(|source| Error::Bind {
        addr: config.ofrep_listen,
        source,
    })?;

    // Every background task ends when this sender is dropped (see each task's `Exit:`).
    let (stop, stopped) = watch::channel(());
    let mut tasks = tokio::task::JoinSet::new();
    let relay = config.serve_replication.then(|| {
        Arc::new(relay::Relay::new(
            state.clone(),
            status.clone(),
            config.replication_retain,
        ))
    });
    tasks.spawn(follower::follow(
        upstream,
        state.clone(),
        status.clone(),
        relay.clone(),
        stopped.clone(),
    ));
    if let Some(path) = config.snapshot_file.clone() {
        let interval = Duration::from_millis(config.snapshot_interval_ms);
        tasks.spawn(keep_snapshot_file(
            path,
            interval,
            state.clone(),
            stopped.clone(),
        ));
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    // Liveness: SERVING for as long as the process runs, whether or not it holds a state.
    health
        .set_service_status(kit::healthcheck::LIVENESS_SERVICE, ServingStatus::Serving)
        .await;
    tasks.spawn(report_health(
        health,
        state.clone(),
        status.clone(),
        config.serve_replication,
        stopped.clone(),
    ));
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(
        &mut registry,
        state.clone(),
        status.clone(),
        metrics::FlagSeries::new(
            &config.flag_metrics_namespaces,
            config.flag_metrics_max_series,
        ),
    );
    authenticator.register(&mut registry);
    let followers = Arc::new(kit::replication::Subscribers::default());
    if relay.is_some() {
        relay::register_metrics(&mut registry, followers.clone(), state.clone());
    }
    let rpc_metrics = RpcMetricsLayer::register(&mut registry);
    let ofrep_requests = ofrep::Requests::register(&mut registry);
    let mut metrics_stop = stopped.clone();
    tasks.spawn(kit::metrics::serve(
        metrics_listener,
        Arc::new(registry),
        async move {
            let _ = metrics_stop.changed().await;
        },
    ));

    let local = listener.local_addr().map_err(|source| Error::Bind {
        addr: config.listen,
        source,
    })?;
    tracing::info!(listen = %local, metrics = %metrics_listen, ofrep = %ofrep_listen, upstream = %config.upstream, "flagread serving");
    let eval = EvalService::new(
        state.clone(),
        status.clone(),
        metrics.clone(),
        service::Limits {
            concurrency: config.concurrency_limit,
            revision_waits: config.max_revision_waits,
            revision_waits_per_token: config.max_revision_waits_per_token,
            revision_horizon: Duration::from_millis(config.revision_horizon_ms),
            watch_streams: config.max_watch_streams,
            watch_streams_per_token: config.max_watch_streams_per_token,
        },
        stopped.clone(),
    );
    started(Handles {
        state: state.clone(),
        status: status.clone(),
        metrics_listen,
        ofrep_listen,
        eval: eval.clone(),
    });
    let access = Arc::new(openfeature::Access::new(
        authenticator.clone(),
        config.anonymous_namespaces.iter().cloned(),
        config.flagd_default_namespace.clone(),
    ));
    let ofrep = ofrep::OfrepService::new(eval.clone(), access.clone(), ofrep_requests)
        .router(&config.ofrep_cors_origins)
        .map_err(Error::Cors)?;
    // OFREP drains with the gRPC server. Exit: when the shutdown channel closes it stops
    // accepting and ends once its calls in flight are answered, within the drain's deadline,
    // which it shares with the other tasks (see below).
    let mut ofrep_stop = stopped.clone();
    tasks.spawn(ofrep::serve(ofrep_listener, ofrep, async move {
        let _ = ofrep_stop.changed().await;
    }));
    let flagd = flagd::FlagdService::new(
        eval.clone(),
        access,
        Duration::from_secs(config.flagd_keepalive_s),
    );
    let eval = tonic::service::interceptor::InterceptedService::new(
        FlagEvalServer::new(eval)
            .max_decoding_message_size(flagstream::validate::MAX_REQUEST_BYTES),
        authenticator.clone(),
    );
    // flagd's services check tokens themselves: some namespaces are readable without one.
    let flagd_v1 = flagd_v1::ServiceServer::new(flagd.clone())
        .max_decoding_message_size(flagstream::validate::MAX_REQUEST_BYTES);
    let flagd_v2 = flagd_v2::ServiceServer::new(flagd)
        .max_decoding_message_size(flagstream::validate::MAX_REQUEST_BYTES);
    let mut listed = vec!["flagstream.v1.FlagEval", FLAGD_V1, FLAGD_V2];
    // Replica chaining: followers of this replica authenticate like FlagEval's callers, with a
    // token of scope `sync`. The stream ends at shutdown with the other background work.
    let replication = relay.map(|relay| {
        listed.push(REPLICATION);
        let (relay_stop_tx, relay_stop) = watch::channel(false);
        let mut stop_relay = stopped.clone();
        tasks.spawn(async move {
            let _ = stop_relay.changed().await;
            let _ = relay_stop_tx.send(true);
        });
        kit::replication::Replication::new(
            relay,
            followers,
            kit::replication::StreamConfig {
                heartbeat: Duration::from_millis(config.replication_heartbeat_ms.max(1)),
                chunk_bytes: 1024 * 1024,
                max_subscribers: config.max_replication_streams,
            },
            relay_stop,
        )
        .into_server(authenticator.clone())
    });
    let (reflection_v1, reflection_v1alpha) = kit::grpc::reflection_for(&listed);
    let mut server = Server::builder()
        .trace_fn(|request| tracing::info_span!("rpc", path = %request.uri().path()))
        .max_concurrent_streams(config.max_concurrent_streams)
        .max_connection_age(Duration::from_secs(config.max_connection_age_s.max(1)))
        .max_connection_age_grace(Duration::from_secs(config.max_connection_age_grace_s))
        .http2_keepalive_interval(Some(Duration::from_secs(config.keepalive_s.max(1))))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)));
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    let router = server
        .layer(rpc_metrics)
        .layer(flagstream::kit::grpc::MalformedRequests)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(eval)
        .add_service(flagd_v1)
        .add_service(flagd_v2)
        .add_optional_service(replication);
    // Small responses must not wait for Nagle's algorithm; large ones are
    // gathered into few writes by the wrapper instead.
    let coalesce = config.coalesce_writes;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(move |conn| {
        conn.map(|stream| {
            let _ = stream.set_nodelay(true);
            kit::coalesce::Coalesced::new(stream, coalesce)
        })
    });
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let serve = router.serve_with_incoming_shutdown(incoming, async move {
        let _ = drain_rx.await;
    });
    tokio::pin!(serve);
    tokio::select! {
        result = &mut serve => {
            drop(stop);
            result?;
            return Ok(());
        }
        _ = shutdown => {}
    }
    tracing::info!("shutting down: draining calls in flight");
    // Ends Watch streams and background tasks, so the drain only waits for unary calls.
    drop(stop);
    let _ = drain_tx.send(());
    let drain = Duration::from_secs(config.drain_s);
    // One deadline for the whole drain: the calls and the tasks share it.
    let deadline = tokio::time::Instant::now() + drain;
    match tokio::time::timeout_at(deadline, &mut serve).await {
        Ok(result) => result?,
        Err(_) => tracing::warn!(?drain, "drain took too long; stopping anyway"),
    }
    // The follower and health tasks end on the closed channel, the OFREP server once its calls
    // in flight are answered; the snapshot writer saves the last state first, in what is left
    // of the drain.
    let joined = tokio::time::timeout_at(deadline, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if joined.is_err() {
        tracing::warn!(
            ?drain,
            "background tasks still running after the drain; stopping them"
        );
    }
    tasks.abort_all();
    tracing::info!("flagread stopped");
    Ok(())
}

/// The health service that reports whether the replica can apply what the writer sends:
/// NOT_SERVING while a revision cannot be applied (see [`SyncStatus::stuck`]), although the
/// replica still serves the revision before it.
pub const SYNC_HEALTH: &str = "flagread.sync";

/// Reports NOT_SERVING until a full state is held, then SERVING; NOT_SERVING again at shutdown.
/// [`SYNC_HEALTH`] follows whether a revision is stuck.
///
/// Exit: when the shutdown channel closes.
async fn report_health(
    health: tonic_health::server::HealthReporter,
    state: Arc<State>,
    sync: Arc<SyncStatus>,
    replication: bool,
    mut stopped: watch::Receiver<()>,
) {
    let mut ready = state.subscribe_ready();
    let mut stuck = sync.subscribe_stuck();
    loop {
        let status = if *ready.borrow_and_update() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        set_health(&health, status, replication).await;
        let applying = if *stuck.borrow_and_update() == 0 {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        health.set_service_status(SYNC_HEALTH, applying).await;
        tokio::select! {
            changed = ready.changed() => if changed.is_err() { break },
            changed = stuck.changed() => if changed.is_err() { break },
            _ = stopped.changed() => break,
        }
    }
    set_health(&health, ServingStatus::NotServing, replication).await;
    health
        .set_service_status(SYNC_HEALTH, ServingStatus::NotServing)
        .await;
}

/// Whether a snapshot file can be the state of a replica serving `filter` (`None` = all): it
/// must say which history it holds, and cover every namespace served.
fn snapshot_fits(
    snapshot: &state::SnapshotBuilder,
    filter: Option<&BTreeSet<String>>,
) -> Result<(), String> {
    if snapshot.history.id.is_empty() || snapshot.history.chain.is_empty() {
        return Err("it does not say which history it holds (written by an older version)".into());
    }
    let Some(covers) = &snapshot.covers else {
        return Ok(());
    };
    let missing: Vec<&String> = match filter {
        None => {
            return Err(format!(
                "it covers only namespaces {covers:?}; this replica serves all"
            ));
        }
        Some(filter) => filter.difference(covers).collect(),
    };
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "it covers namespaces {covers:?}, not {missing:?} which this replica serves"
        ))
    }
}

/// Writes the state to the snapshot file after changes, at most once per `interval`, and once
/// more at shutdown if anything changed since the last write.
///
/// Exit: when the shutdown channel closes (after the final write).
async fn keep_snapshot_file(
    path: PathBuf,
    interval: Duration,
    state: Arc<State>,
    mut stopped: watch::Receiver<()>,
) {
    let mut revisions = state.subscribe_revision();
    let mut written: Option<u64> = None;
    loop {
        let stopping = tokio::select! {
            changed = revisions.changed() => changed.is_err(),
            _ = stopped.changed() => true,
        };
        let replica = state.load();
        if state.is_ready() && written != Some(replica.revision) {
            let revision = replica.revision;
            let target = path.clone();
            let covers = state.filter().cloned();
            // Copying and encoding the whole state is heavy: off the async workers.
            let write = move || {
                let mut snapshot = replica.to_snapshot();
                snapshot.covers = covers;
                wire::write_snapshot_file(&target, snapshot)
            };
            match tokio::task::spawn_blocking(write).await {
                Ok(Ok(())) => {
                    written = Some(revision);
                    tracing::debug!(revision, "snapshot file written");
                }
                Ok(Err(error)) => tracing::warn!(%error, "cannot write the snapshot file"),
                Err(error) => tracing::warn!(%error, "the snapshot file writer failed"),
            }
        }
        if stopping {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stopped.changed() => {}
        }
    }
}

/// flagd's evaluation service, version 1.
const FLAGD_V1: &str = "flagd.evaluation.v1.Service";
/// The Replication service, served with `--serve-replication`.
const REPLICATION: &str = "flagstream.v1.Replication";
/// flagd's evaluation service, version 2.
const FLAGD_V2: &str = "flagd.evaluation.v2.Service";

/// Sets the overall status (""), FlagEval's and flagd's services'.
async fn set_health(
    health: &tonic_health::server::HealthReporter,
    status: ServingStatus,
    replication: bool,
) {
    if replication {
        health.set_service_status(REPLICATION, status).await;
    }
    health.set_service_status("", status).await;
    health.set_service_status(FLAGD_V1, status).await;
    health.set_service_status(FLAGD_V2, status).await;
    health
        .set_service_status(
            <FlagEvalServer<EvalService> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
}
