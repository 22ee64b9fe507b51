//! TLS on both sides of a replica: it follows an `https://` writer whose certificate a given CA
//! signed, and serves FlagEval over TLS; it follows a real flagwrite that requires client
//! certificates with `--upstream-cert`/`--upstream-key`, and says TLS when it has none.
//! Certificates are made with the `openssl` command; where it is missing the test says so and
//! passes.

mod cluster;
mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use flagread::Config;
use flagstream::pb;
use flagstream::pb::flag_eval_client::FlagEvalClient;
use support::*;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, ServerTlsConfig};

/// Makes a CA, a server certificate for `localhost` / 127.0.0.1 (`server.pem`) and a client
/// certificate (`client.pem`) signed by it in `dir`; false when openssl is not available.
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
    std::fs::write(
        dir.join("client.cnf"),
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    let steps: [&[&str]; 5] = [
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
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "client.key",
            "-out",
            "client.csr",
            "-subj",
            "/CN=flagread replica",
        ],
        &[
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "client.pem",
            "-days",
            "2",
            "-extfile",
            "client.cnf",
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

/// A flagwrite process requiring client certificates signed by the test CA; killed when dropped.
struct MutualTlsWriter {
    child: std::process::Child,
    port: u16,
}

impl Drop for MutualTlsWriter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Text of the file at `path` once it contains `needle`, waiting up to 15 s; `None` after that.
async fn log_containing(path: &Path, needle: &str) -> Option<String> {
    for _ in 0..150 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return Some(text);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_a_writer_that_requires_client_certificates() {
    let dir = std::env::temp_dir().join(format!(
        "flagread-mtls-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    if !certificates(&dir) {
        return;
    }
    let path = |name: &str| dir.join(name).display().to_string();
    let port = cluster::free_port();
    let writer_log = std::fs::File::create(dir.join("flagwrite.log")).unwrap();
    let child = Command::new(cluster::flagwrite_bin())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--data-dir", &path("data")])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .arg("--dev-no-auth")
        .args([
            "--tls-cert",
            &path("server.pem"),
            "--tls-key",
            &path("server.key"),
        ])
        .args(["--tls-client-ca", &path("ca.pem")])
        .args(["--heartbeat-ms", "200"])
        .stdout(std::process::Stdio::null())
        .stderr(writer_log)
        .spawn()
        .expect("flagwrite starts");
    let writer = MutualTlsWriter { child, port };
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    let client_tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")))
        .domain_name("localhost")
        .identity(Identity::from_pem(read("client.pem"), read("client.key")));
    let endpoint = Channel::from_shared(format!("https://127.0.0.1:{}", writer.port))
        .unwrap()
        .tls_config(client_tls)
        .unwrap();
    let mut admin = None;
    for _ in 0..250 {
        if let Ok(channel) = endpoint.connect().await {
            admin = Some(flagstream::pb::flag_admin_client::FlagAdminClient::new(
                channel,
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut admin = admin.expect("flagwrite listens over TLS");
    let revision = admin
        .create_namespace(pb::CreateNamespaceRequest {
            namespace: Some(namespace("prod")),
            options: None,
        })
        .await
        .expect("a client with a certificate writes")
        .into_inner()
        .revision;

    // A replica with the client certificate syncs.
    let upstream = format!("https://127.0.0.1:{}", writer.port);
    let mut config = Config::local(upstream.clone());
    config.upstream_ca = Some(dir.join("ca.pem"));
    config.upstream_domain = Some("localhost".into());
    config.upstream_cert = Some(dir.join("client.pem"));
    config.upstream_key = Some(dir.join("client.key"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (handles_tx, handles_rx) = tokio::sync::oneshot::channel();
    let replica = tokio::spawn(flagread::run_with(
        listener,
        config,
        async {
            let _ = stopped.await;
        },
        move |handles| {
            let _ = handles_tx.send(handles);
        },
    ));
    let handles: flagread::Handles = handles_rx.await.unwrap();
    let state = handles.state.clone();
    eventually(
        "the replica with a certificate holds the writer's state",
        || state.is_ready() && state.revision() >= revision,
    )
    .await;

    // A replica without one is refused, and its log says it is TLS, not the network.
    let replica_log = dir.join("flagread.log");
    let mut without = Command::new(env!("CARGO_BIN_EXE_flagread"))
        .args(["--listen", &format!("127.0.0.1:{}", cluster::free_port())])
        .args(["--metrics-listen", "127.0.0.1:0", "--dev-no-auth"])
        .args(["--ofrep-listen", "127.0.0.1:0"])
        .args(["--upstream", &upstream, "--upstream-ca", &path("ca.pem")])
        .args(["--upstream-domain", "localhost"])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&replica_log).unwrap())
        .spawn()
        .expect("flagread starts");
    let log = log_containing(&replica_log, "TLS with the writer failed").await;
    let _ = without.kill();
    let _ = without.wait();
    let log = log.unwrap_or_else(|| {
        panic!(
            "no TLS failure logged:\n{}",
            std::fs::read_to_string(&replica_log).unwrap_or_default()
        )
    });
    assert!(
        log.to_ascii_lowercase().contains("certificate"),
        "the failure does not name the certificate:\n{log}"
    );

    let _ = stop.send(());
    replica.await.unwrap().unwrap();
    drop(writer);
    std::fs::remove_dir_all(dir).unwrap();
}
