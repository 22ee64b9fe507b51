//! Server plumbing shared by flagwrite and flagread: bearer-token auth, tracing
//! set-up, a Prometheus `/metrics` endpoint, TLS loading, gRPC reflection,
//! the shutdown signal and write gathering for large answers.
//!
//! # Layout
//! - [`auth`]: the tokens file, the constant-time bearer check (a tonic
//!   interceptor) and scope checks in handlers.
//! - [`telemetry`]: tracing subscriber set-up, text or JSON.
//! - [`metrics`]: `prometheus-client` registries rendered in the Prometheus
//!   text format off the async workers, the lock-free latency histogram, and
//!   the tiny HTTP server that serves them.
//! - [`rpc_metrics`]: the tower layer counting every gRPC call by service,
//!   method and status code.
//! - [`shutdown`]: a future that completes on SIGTERM or SIGINT.
//! - [`grpc`]: TLS configuration and server reflection (v1 and v1alpha).
//! - [`coalesce`]: a TCP connection wrapper that gathers an HTTP/2 server's
//!   writes of a large answer into one (flagread serves through it).
//! - [`replication`]: the server side of the Replication change stream (shared snapshots,
//!   resume, heartbeats), served by flagwrite from its store and by a flagread replica from its
//!   own state.
//! - [`healthcheck`]: the `healthcheck` subcommand of both binaries (one
//!   `grpc.health.v1.Health/Check` call, for exec probes) and the liveness
//!   health service name.

pub mod auth;
pub mod coalesce;
pub mod grpc;
pub mod healthcheck;
pub mod metrics;
pub mod replication;
pub mod rpc_metrics;
pub mod shutdown;
pub mod telemetry;
