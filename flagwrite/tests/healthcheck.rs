//! The `healthcheck` subcommand's check against a real writer on 127.0.0.1:0:
//! SERVING for the server and the liveness service, an error for a service the
//! server does not know, and for a port nobody listens on.

mod common;

use common::*;
use flagstream::kit::healthcheck::{CheckError, LIVENESS_SERVICE, Options, check};
use tonic_health::pb::health_check_response::ServingStatus;

fn options(addr: String, service: &str) -> Options {
    Options {
        addr,
        service: service.to_string(),
        tls_ca: None,
        tls_domain: None,
        tls_cert: None,
        tls_key: None,
        timeout_ms: 3000,
    }
}

#[tokio::test]
async fn serving_for_the_server_and_liveness_not_found_for_others() {
    let server = Server::start().await;
    server.channel().await;
    let addr = server.addr.to_string();
    for service in ["", LIVENESS_SERVICE, "flagstream.v1.FlagAdmin"] {
        let status = check(&options(addr.clone(), service)).await.unwrap();
        assert_eq!(status, ServingStatus::Serving, "{service:?}");
    }
    let unknown = check(&options(addr.clone(), "no.such.Service")).await;
    assert!(
        matches!(unknown, Err(CheckError::Call(ref m)) if m.contains("NotFound")),
        "{unknown:?}"
    );
    let url = check(&options(format!("http://{addr}"), "")).await.unwrap();
    assert_eq!(url, ServingStatus::Serving);
    server.stop().await;
    let gone = check(&options(addr, "")).await;
    assert!(matches!(gone, Err(CheckError::Connect(..))), "{gone:?}");
}
