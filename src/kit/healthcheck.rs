//! The `healthcheck` subcommand of both binaries: one `grpc.health.v1.Health/Check` call that
//! exits 0 only on SERVING. Container images without a shell or grpcurl use it as an exec probe
//! (the Helm chart does when TLS is on the serving port, where Kubernetes' native gRPC probe
//! cannot be used) and `helm test` runs it against both Services.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The health service name both binaries report SERVING for as long as the process runs, so a
/// liveness probe does not restart a replica that is merely behind or cut off from the writer.
pub const LIVENESS_SERVICE: &str = "flagstream.liveness";

/// The subcommand's name, as the first argument of either binary.
pub const SUBCOMMAND: &str = "healthcheck";

/// The options of `<binary> healthcheck`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    about = "Calls grpc.health.v1.Health/Check once; exits 0 only on SERVING (1 otherwise, 2 on bad options)"
)]
pub struct Options {
    /// The server: `host:port` (plain text, or TLS with --tls-ca) or an `http://` / `https://` URL.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub addr: String,
    /// Health service name to check; empty is the server as a whole.
    #[arg(long, default_value = "")]
    pub service: String,
    /// PEM CA that signed the server's certificate; turns TLS on.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Server name expected in the certificate (default: the host of --addr).
    #[arg(long)]
    pub tls_domain: Option<String>,
    /// PEM client certificate, for a server that requires one (mTLS), with --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Time allowed for connecting and the call together, in milliseconds.
    #[arg(long, default_value_t = 3000)]
    pub timeout_ms: u64,
}

/// Whether the process was started as `<binary> healthcheck …`.
pub fn requested() -> bool {
    std::env::args_os()
        .nth(1)
        .is_some_and(|arg| arg == SUBCOMMAND)
}

/// Runs `<binary> healthcheck` from the process arguments on a small runtime of its own (for a
/// `main` that has not started one).
pub fn main_blocking(binary: &str) -> ExitCode {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(main(binary)),
        Err(error) => {
            eprintln!("{binary} {SUBCOMMAND}: cannot start the runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `<binary> healthcheck` from the process arguments: prints the status and returns 0 on
/// SERVING, 1 on anything else or an error, 2 on bad options.
pub async fn main(binary: &str) -> ExitCode {
    let args = std::env::args_os().skip(2);
    let name = format!("{binary} {SUBCOMMAND}");
    let args = std::iter::once(OsString::from(name.clone())).chain(args);
    let options = match <Options as clap::Parser>::try_parse_from(args) {
        Ok(options) => options,
        Err(error)
            if matches!(
                error.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            error.exit()
        }
        Err(error) => {
            let message = error.to_string();
            let first = message.lines().next().unwrap_or("invalid arguments");
            eprintln!("{name}: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    match check(&options).await {
        Ok(ServingStatus::Serving) => {
            println!("SERVING");
            ExitCode::SUCCESS
        }
        Ok(status) => {
            println!("{}", status.as_str_name());
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("{name}: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Why the check could not get a status.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// --addr is not a usable address.
    #[error("bad --addr {0:?}: {1}")]
    Addr(String, String),
    /// A TLS file could not be read or used.
    #[error("TLS: {0}")]
    Tls(String),
    /// Connecting took longer than the timeout or was refused.
    #[error("cannot connect to {0}: {1}")]
    Connect(String, String),
    /// The call failed (for example NOT_FOUND for an unknown service name).
    #[error("Health/Check: {0}")]
    Call(String),
    /// Connecting and the call together took longer than the timeout.
    #[error("no answer within {0} ms")]
    Timeout(u64),
}

/// Calls `Health/Check` once for `options.service` and returns the status the server reported.
pub async fn check(options: &Options) -> Result<ServingStatus, CheckError> {
    let timeout = Duration::from_millis(options.timeout_ms.max(1));
    let tls = options.tls_ca.is_some() || options.addr.starts_with("https://");
    let url = if options.addr.contains("://") {
        options.addr.clone()
    } else if tls {
        format!("https://{}", options.addr)
    } else {
        format!("http://{}", options.addr)
    };
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| CheckError::Addr(options.addr.clone(), e.to_string()))?
        .connect_timeout(timeout)
        .timeout(timeout);
    if tls {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| CheckError::Tls(format!("{}: {e}", path.display())))
        };
        let mut config = ClientTlsConfig::new();
        if let Some(ca) = &options.tls_ca {
            config = config.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let Some(domain) = &options.tls_domain {
            config = config.domain_name(domain.clone());
        }
        if let (Some(cert), Some(key)) = (&options.tls_cert, &options.tls_key) {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| CheckError::Tls(e.to_string()))?;
    }
    let call = async {
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| CheckError::Connect(url.clone(), error_chain(&e)))?;
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: options.service.clone(),
            })
            .await
            .map_err(|status| {
                CheckError::Call(format!("{:?}: {}", status.code(), status.message()))
            })?;
        Ok(ServingStatus::try_from(response.into_inner().status).unwrap_or(ServingStatus::Unknown))
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| CheckError::Timeout(options.timeout_ms))?
}

/// An error and its sources on one line (a connection error's cause is in its source).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
