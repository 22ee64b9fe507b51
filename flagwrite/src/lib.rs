//! flagwrite: the only writer of flagstream. Serves FlagAdmin (namespaces,
//! flags, segments, history, import/export) and the Replication change
//! stream on one gRPC port, over a sled store in which every acknowledged
//! write is durable and has a gap-free revision.
//!
//! # Layout
//! - [`Config`] and [`run`]: the entry point `main` and the tests share.
//! - [`store`]: the only module touching sled (objects, change log, head).
//! - [`writer`]: the single writer task with group commit; plans each write
//!   (validation through [`checks`]) and commits it.
//! - [`service`]: the FlagAdmin gRPC service.
//! - [`feed`] and [`replication`]: the change stream.
//! - [`error`]: the error boundary and its gRPC status codes.
//! - [`metrics`]: Prometheus metrics.
#![forbid(unsafe_code)]

pub mod checks;
pub mod error;
pub mod feed;
pub mod metrics;
pub mod replication;
pub mod service;
pub mod store;
pub mod writer;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flagstream::kit::auth::{Authenticator, Tokens};
use flagstream::kit::rpc_metrics::RpcMetricsLayer;
use flagstream::kit::telemetry::LogFormat;
use flagstream::pb::flag_admin_server::FlagAdminServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::{Server, ServerTlsConfig};

use crate::metrics::Metrics;
use crate::replication::{Replication, StreamConfig, WriterSource};
use crate::service::Admin;
use crate::store::Store;
use crate::writer::Writer;

/// flagwrite's configuration: every option is a flag and an environment
/// variable `FLAGWRITE_<NAME>`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "flagwrite",
    version,
    about = "flagstream's writer: the FlagAdmin API and the replication stream"
)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "FLAGWRITE_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,
    /// Directory of the sled database (created if missing).
    #[arg(long, env = "FLAGWRITE_DATA_DIR", default_value = "./data/flagwrite")]
    pub data_dir: PathBuf,
    /// The tokens file (see the README for its format). Required unless
    /// --dev-no-auth.
    #[arg(long, env = "FLAGWRITE_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// PEM certificate chain; serving TLS needs it and --tls-key.
    #[arg(long, env = "FLAGWRITE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "FLAGWRITE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate; when given, clients must present a certificate it signed.
    #[arg(long, env = "FLAGWRITE_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// How many revisions the change log keeps (history and replica catch-up);
    /// older ones are compacted away. 0 keeps everything.
    #[arg(long, env = "FLAGWRITE_CHANGELOG_RETENTION", default_value_t = 100_000)]
    pub changelog_retention: u64,
    /// Address of the Prometheus `/metrics` endpoint.
    #[arg(long, env = "FLAGWRITE_METRICS_LISTEN", default_value = "0.0.0.0:9091")]
    pub metrics_listen: Option<SocketAddr>,
    /// Log format: text or json.
    #[arg(long, env = "FLAGWRITE_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    /// Development only: accept every call without a token, as actor `dev`.
    #[arg(long, env = "FLAGWRITE_DEV_NO_AUTH")]
    pub dev_no_auth: bool,
    /// Milliseconds between heartbeats on the change stream.
    #[arg(long, env = "FLAGWRITE_HEARTBEAT_MS", default_value_t = 5000)]
    pub heartbeat_ms: u64,
    /// How many recent changes are kept encoded in memory for subscribers;
    /// subscribers further behind read the change log on disk.
    #[arg(long, env = "FLAGWRITE_FEED_CAPACITY", default_value_t = 4096)]
    pub feed_capacity: usize,
    /// Replication subscribers served at once; more are refused with
    /// RESOURCE_EXHAUSTED (replicas retry with backoff). Past a few hundred,
    /// let replicas follow replicas (flagread --serve-replication).
    #[arg(long, env = "FLAGWRITE_MAX_SUBSCRIBERS", default_value_t = 4096)]
    pub max_subscribers: usize,
    /// Seconds in-flight calls get to finish after SIGTERM (keep it below the
    /// chart's terminationGracePeriodSeconds).
    /// The whole drain is bounded by it: streams, calls, the writer's queue.
    #[arg(long, env = "FLAGWRITE_SHUTDOWN_GRACE_SECS", default_value_t = 20)]
    pub shutdown_grace_secs: u64,
    /// Seconds between HTTP/2 keepalive pings to each client (0: no pings). A replica that
    /// vanished without closing its connection is found by an unanswered ping, and its
    /// subscription ends.
    #[arg(long, env = "FLAGWRITE_KEEPALIVE_S", default_value_t = 20)]
    pub keepalive_s: u64,
    /// Seconds a keepalive ping may go unanswered before the connection is closed.
    #[arg(long, env = "FLAGWRITE_KEEPALIVE_TIMEOUT_S", default_value_t = 10)]
    pub keepalive_timeout_s: u64,
}

/// Why flagwrite could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration is unusable; the message says which option.
    #[error("{0}")]
    Config(String),
    /// The store could not be opened.
    #[error("cannot open the store: {0}")]
    Store(#[from] store::StoreError),
    /// A flush failed while serving: flagwrite stopped (fail-stop) and
    /// recovery runs when it is started again.
    #[error("stopped because writes could not be made durable ({0}); restart to recover")]
    NotDurable(store::StoreError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The metrics endpoint could not bind.
    #[error("cannot listen for metrics on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The configuration after loading the files it names.
pub struct Prepared {
    pub auth: Authenticator,
    pub tls: Option<ServerTlsConfig>,
}

impl Config {
    /// Checks the options and loads the tokens and TLS files; the error is
    /// one line naming the bad option.
    pub fn prepare(&self) -> Result<Prepared, RunError> {
        let auth = match (&self.tokens_file, self.dev_no_auth) {
            (Some(_), true) => {
                return Err(RunError::Config(
                    "--tokens-file and --dev-no-auth exclude each other".into(),
                ));
            }
            (None, false) => {
                return Err(RunError::Config(
                    "no --tokens-file (FLAGWRITE_TOKENS_FILE) given; pass --dev-no-auth to run without auth in development".into(),
                ));
            }
            (None, true) => Authenticator::allow_all(),
            (Some(path), false) => {
                Authenticator::new(Tokens::load(path).map_err(|e| RunError::Config(e.to_string()))?)
            }
        };
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(
                flagstream::kit::grpc::tls_config(cert, key, self.tls_client_ca.as_deref())
                    .map_err(|e| RunError::Config(e.to_string()))?,
            ),
            (None, None) if self.tls_client_ca.is_some() => {
                return Err(RunError::Config(
                    "--tls-client-ca needs --tls-cert and --tls-key".into(),
                ));
            }
            (None, None) => None,
            _ => {
                return Err(RunError::Config(
                    "--tls-cert and --tls-key must be given together".into(),
                ));
            }
        };
        if self.heartbeat_ms == 0 {
            return Err(RunError::Config("--heartbeat-ms must be above 0".into()));
        }
        Ok(Prepared { auth, tls })
    }
}

/// Serves flagwrite on `listener` until `shutdown` completes, then stops
/// accepting, ends the change streams, lets in-flight calls finish and drains
/// the writer, all within one grace period from the signal, and flushes.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let prepared = config.prepare()?;
    let dir = config.data_dir.clone();
    let (store, head, compacted) = tokio::task::spawn_blocking(move || {
        let store = Store::open(&dir)?;
        let (head, compacted) = (store.head()?, store.compacted()?);
        Ok::<_, store::StoreError>((store, head, compacted))
    })
    .await
    .map_err(|e| RunError::Config(format!("opening the store: {e}")))??;
    let feed = Arc::new(feed::new_feed(head, compacted, config.feed_capacity));
    let metrics = Arc::new(Metrics::default());
    metrics.head_revision.set(head as i64);
    let (writer, writer_exit) = Writer::spawn(
        store.clone(),
        feed.clone(),
        metrics.clone(),
        config.changelog_retention,
    )
    .map_err(|e| RunError::Config(format!("cannot start the writer thread: {e}")))?;
    // Set when the writer stops because a flush failed; serving stops then.
    let (failed_tx, mut failed_rx) = watch::channel(false);
    // Ends when the writer thread does.
    let writer_task = tokio::spawn(async move {
        // A writer thread that ends without saying how has panicked: as
        // final as a failed flush.
        let exit = writer_exit.await.unwrap_or_else(|_| {
            writer::Exit::FlushFailed(store::StoreError::Corrupt(
                "the writer thread panicked".into(),
            ))
        });
        if matches!(exit, writer::Exit::FlushFailed(_)) {
            let _ = failed_tx.send(true);
        }
        exit
    });
    let (stop_tx, stop_rx) = watch::channel(false);

    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    prepared.auth.register(&mut registry);
    let rpc_metrics = RpcMetricsLayer::register(&mut registry);
    let registry = Arc::new(registry);
    if let Some(addr) = config.metrics_listen {
        let metrics_listener = TcpListener::bind(addr)
            .await
            .map_err(|source| RunError::Metrics { addr, source })?;
        tracing::info!(addr = %metrics_listener.local_addr().unwrap_or(addr), "metrics endpoint listening");
        let mut stop = stop_rx.clone();
        // Ends at shutdown.
        tokio::spawn(flagstream::kit::metrics::serve(
            metrics_listener,
            registry.clone(),
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        ));
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<FlagAdminServer<Admin>>().await;
    health
        .set_service_status(
            "flagstream.v1.Replication",
            tonic_health::ServingStatus::Serving,
        )
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    health
        .set_service_status(
            flagstream::kit::healthcheck::LIVENESS_SERVICE,
            tonic_health::ServingStatus::Serving,
        )
        .await;
    let (reflection_v1, reflection_v1alpha) = flagstream::kit::grpc::reflection_for(&[
        "flagstream.v1.FlagAdmin",
        "flagstream.v1.Replication",
    ]);

    let admin = tonic::service::interceptor::InterceptedService::new(
        FlagAdminServer::new(Admin::new(
            store.clone(),
            writer,
            feed.clone(),
            metrics.clone(),
        ))
        .max_decoding_message_size(flagstream::validate::MAX_REQUEST_BYTES),
        prepared.auth.clone(),
    );
    let stream_config = StreamConfig {
        heartbeat: Duration::from_millis(config.heartbeat_ms),
        chunk_bytes: 1024 * 1024,
        max_subscribers: config.max_subscribers,
    };
    let replication = Replication::new(
        Arc::new(WriterSource::new(store.clone(), feed)),
        metrics.subscribers.clone(),
        stream_config,
        stop_rx.clone(),
    )
    .into_server(prepared.auth);

    let keepalive = (config.keepalive_s > 0).then(|| Duration::from_secs(config.keepalive_s));
    let mut builder = Server::builder()
        .http2_keepalive_interval(keepalive)
        .http2_keepalive_timeout(Some(Duration::from_secs(config.keepalive_timeout_s.max(1))));
    if let Some(tls) = prepared.tls {
        builder = builder.tls_config(tls)?;
    }
    let router = builder
        .trace_fn(|req| tracing::info_span!("rpc", method = %req.uri().path()))
        .layer(rpc_metrics)
        .layer(flagstream::kit::grpc::MalformedRequests)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(admin)
        .add_service(replication);

    tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), revision = head, "flagwrite serving");
    let health_on_stop = health.clone();
    let signal = async move {
        tokio::select! {
            _ = shutdown => tracing::info!("shutting down: ending streams, draining writes"),
            _ = failed_rx.wait_for(|failed| *failed) => tracing::error!("a flush failed: stopping (fail-stop), ending streams"),
        }
        for service in ["", "flagstream.v1.FlagAdmin", "flagstream.v1.Replication"] {
            health_on_stop
                .set_service_status(service, tonic_health::ServingStatus::NotServing)
                .await;
        }
        let _ = stop_tx.send(true);
    };
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let mut stopped = stop_rx.clone();
    // Nagle's algorithm would hold small responses back for the peer's
    // delayed ACK, adding milliseconds to every acknowledgement.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let served = router.serve_with_incoming_shutdown(incoming, signal);
    tokio::pin!(served);
    let mut finished = None;
    tokio::select! {
        result = &mut served => finished = Some(result),
        _ = stopped.wait_for(|s| *s) => {}
    }
    // One deadline for the whole drain: what the calls leave of the grace
    // period is all the writer gets.
    let deadline = tokio::time::Instant::now() + grace;
    let finished = match finished {
        Some(result) => Some(result),
        None => tokio::time::timeout_at(deadline, &mut served).await.ok(),
    };
    match finished {
        Some(result) => result?,
        None => tracing::warn!(
            grace_secs = config.shutdown_grace_secs,
            "calls still running after the grace period; stopping anyway"
        ),
    }
    // Every service (and with it every `Writer` handle) is dropped once the
    // connections are, so the writer drains its queue, flushes and ends.
    match tokio::time::timeout_at(deadline, writer_task).await {
        Ok(Ok(writer::Exit::FlushFailed(e))) => {
            // No more I/O after a failed sync: dropping the last handle
            // would make sled flush and sync again (and it panics when that
            // fails). The process exits next; recovery runs at restart.
            std::mem::forget(store);
            return Err(RunError::NotDurable(e));
        }
        Ok(_) => {}
        Err(_) => tracing::warn!("the writer did not finish within the grace period"),
    }
    let flushed = store.clone();
    tokio::task::spawn_blocking(move || flushed.flush())
        .await
        .map_err(|e| RunError::Config(format!("final flush: {e}")))?
        .map_err(RunError::NotDurable)?;
    tracing::info!("flagwrite stopped");
    Ok(())
}
