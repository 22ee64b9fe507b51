//! TLS on both sides of a replica: it follows an `https://` writer whose certificate a given CA
//! signed, and serves FlagEval over TLS. Certificates are made with the `openssl` command; where
//! it is missing the test says so and passes.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use flagread::Config;
use flagstream::pb;
use flagstream::pb::flag_eval_client::FlagEvalClient;
use support::*;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, ServerTlsConfig};

/// Makes a CA and a certificate for `localhost` / 127.0.0.1 signed by it in `dir`; false when
/// openssl is not available.
fn certificates(dir: &Path) -> bool {
    let openssl = |args: &[&str]| {
        Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !openssl(&["version"]) {
        assert!(
            std::env::var_os("CI").is_none(),
            "the openssl command is not available (CI must have it)"
        );
        eprintln!("NOTICE: skipping: the openssl command is not available");
        return false;
    }
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let steps: [&[&str]; 3] = [
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=flagstream test CA",
        ],
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    ];
    for step in steps {
        assert!(openssl(step), "openssl {step:?} failed");
    }
    true
}

#[tokio::test]
async fn follows_a_tls_writer_and_serves_tls() {
    let dir = std::env::temp_dir().join(format!(
        "flagread-tls-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    if !certificates(&dir) {
        return;
    }
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    let identity = Identity::from_pem(read("server.pem"), read("server.key"));
    let mut fake = FakeUpstream::start_with(Some(ServerTlsConfig::new().identity(identity))).await;
    assert!(fake.url.starts_with("https://"));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut config = Config::local(fake.url.clone());
    config.upstream_ca = Some(dir.join("ca.pem"));
    config.upstream_domain = Some("localhost".into());
    config.tls_cert = Some(dir.join("server.pem"));
    config.tls_key = Some(dir.join("server.key"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let replica = tokio::spawn(flagread::run(listener, config, async {
        let _ = stopped.await;
    }));

    // The subscription arrives over TLS, and the replica applies what it gets.
    // "big" answers EvaluateAll with about 120 KB: more than the 64 KiB the
    // replica's write gathering (on by default) holds, under TLS records.
    let sub = fake.next().await;
    let mut flags = vec![flag("prod", "a", 3)];
    flags.extend((0..3000).map(|i| flag("big", &format!("flag-{i:04}"), 3)));
    sub.send(snapshot(3, flags)).await;

    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = FlagEvalClient::new(channel);
    let request = pb::EvaluateRequest {
        namespace: "prod".into(),
        flag_key: "a".into(),
        min_revision: 3,
        ..Default::default()
    };
    let mut request = tonic::Request::new(request);
    request.set_timeout(Duration::from_secs(5));
    let response = client.evaluate(request).await.unwrap().into_inner();
    assert_eq!((response.variant.as_str(), response.revision), ("on", 3));

    // Large answers, many in flight on one TLS connection, arrive whole, well
    // within what a stalled write would cost (a put-off write that nobody
    // makes waits for the next keepalive, tens of seconds, or for ever).
    let all = pb::EvaluateAllRequest {
        namespace: "big".into(),
        min_revision: 3,
        ..Default::default()
    };
    let calls = async {
        let expected = client.evaluate_all(all.clone()).await.unwrap().into_inner();
        assert_eq!(expected.results.len(), 3000);
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..24 {
            let (mut client, all, expected) = (client.clone(), all.clone(), expected.clone());
            calls.spawn(async move {
                let answer = client.evaluate_all(all).await.unwrap().into_inner();
                assert!(answer == expected, "an answer over TLS differs");
            });
        }
        while let Some(call) = calls.join_next().await {
            call.expect("every call answered whole");
        }
    };
    tokio::time::timeout(Duration::from_secs(10), calls)
        .await
        .expect("every call answered within 10 s");

    // A plaintext client gets nowhere.
    let plain = FlagEvalClient::connect(format!("http://127.0.0.1:{port}")).await;
    if let Ok(mut plain) = plain {
        let request = pb::EvaluateRequest {
            namespace: "prod".into(),
            flag_key: "a".into(),
            ..Default::default()
        };
        assert!(plain.evaluate(request).await.is_err());
    }
    let _ = stop.send(());
    replica.await.unwrap().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}
