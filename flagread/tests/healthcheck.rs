//! Liveness and readiness as the `healthcheck` subcommand sees them on a replica on
//! 127.0.0.1:0: `flagstream.liveness` is SERVING from the start, whether or not the writer
//! answers; the server as a whole only once a full state is held.

mod support;

use std::time::Duration;

use flagstream::kit::healthcheck::{LIVENESS_SERVICE, Options, check};
use support::*;
use tonic_health::pb::health_check_response::ServingStatus;

async fn status(addr: &str, service: &str) -> ServingStatus {
    let options = Options {
        addr: addr.to_string(),
        service: service.to_string(),
        tls_ca: None,
        tls_domain: None,
        tls_cert: None,
        tls_key: None,
        timeout_ms: 3000,
    };
    for _ in 0..100 {
        if let Ok(status) = check(&options).await {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no health answer from {addr}");
}

#[tokio::test]
async fn alive_before_ready_and_ready_after_the_first_snapshot() {
    let mut fake = FakeUpstream::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let replica = tokio::spawn(flagread::run(
        listener,
        flagread::Config::local(fake.url.clone()),
        async {
            let _ = stopped.await;
        },
    ));

    assert_eq!(
        status(&addr, LIVENESS_SERVICE).await,
        ServingStatus::Serving
    );
    assert_eq!(status(&addr, "").await, ServingStatus::NotServing);

    let subscription = fake.next().await;
    subscription
        .send(snapshot(1, vec![flag("ns", "a", 1)]))
        .await;
    eventually_async("the replica to report SERVING", || {
        let addr = addr.clone();
        async move { status(&addr, "").await == ServingStatus::Serving }
    })
    .await;
    assert_eq!(
        status(&addr, LIVENESS_SERVICE).await,
        ServingStatus::Serving
    );

    // Cut off from the writer: still alive, still ready with what it holds.
    drop(subscription);
    drop(fake);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        status(&addr, LIVENESS_SERVICE).await,
        ServingStatus::Serving
    );
    assert_eq!(status(&addr, "").await, ServingStatus::Serving);

    let _ = stop.send(());
    replica.await.unwrap().unwrap();
}
