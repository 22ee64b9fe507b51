//! gRPC server helpers both services use: TLS from PEM files and server
//! reflection in both protocol versions (grpcurl 1.8 speaks v1alpha).

use std::path::Path;

use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic_reflection::server::{v1, v1alpha};

/// Why TLS could not be configured; the message names the file.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {what} {path}: {source}")]
pub struct TlsError {
    what: &'static str,
    path: String,
    #[source]
    source: std::io::Error,
}

/// Builds a TLS configuration from a PEM certificate chain and key, requiring
/// client certificates signed by `client_ca` when one is given.
pub fn tls_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<ServerTlsConfig, TlsError> {
    let read = |what: &'static str, path: &Path| {
        std::fs::read(path).map_err(|source| TlsError {
            what,
            path: path.display().to_string(),
            source,
        })
    };
    let mut config = ServerTlsConfig::new().identity(Identity::from_pem(
        read("TLS certificate", cert)?,
        read("TLS key", key)?,
    ));
    if let Some(ca) = client_ca {
        config = config.client_ca_root(Certificate::from_pem(read("client CA", ca)?));
    }
    Ok(config)
}

/// The reflection services, v1 and v1alpha, listing only `services` (full
/// names such as `flagstream.v1.FlagAdmin`) besides health and reflection
/// itself; every message type stays describable. Empty lists everything.
pub fn reflection_for(
    services: &[&str],
) -> (
    v1::ServerReflectionServer<impl v1::ServerReflection>,
    v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection>,
) {
    let builder = || {
        // Both reflection versions are registered (and listed) by both
        // servers, so a client of either version sees the whole picture.
        let mut builder = tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            );
        if !services.is_empty() {
            builder = builder
                .with_service_name("grpc.health.v1.Health")
                .with_service_name("grpc.reflection.v1.ServerReflection")
                .with_service_name("grpc.reflection.v1alpha.ServerReflection");
            for service in services {
                builder = builder.with_service_name(*service);
            }
        }
        builder
    };
    let v1 = builder()
        .build_v1()
        .expect("the compiled-in descriptor set is valid");
    let v1alpha = builder()
        .build_v1alpha()
        .expect("the compiled-in descriptor set is valid");
    (v1, v1alpha)
}
