//! The real binary under kill -9: every acknowledged write survives, no read
//! showed a write the crash took back, and the revisions have no gap. Also: SIGTERM stops it cleanly, and bad
//! configuration exits non-zero with one line.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::process::Process;
use common::*;
use flagstream::pb;
use flagstream::pb::flag_admin_client::FlagAdminClient;

async fn client(process: &Process) -> FlagAdminClient<tonic::transport::Channel> {
    FlagAdminClient::connect(process.url()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let dir = TempDir::new("crash");
    let data = dir.0.join("data");
    let mut process = Process::start(&data, &["--dev-no-auth"]);
    let mut admin = client(&process).await;
    admin
        .create_namespace(pb::CreateNamespaceRequest {
            namespace: Some(namespace("prod")),
            options: None,
        })
        .await
        .unwrap();

    let acked: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..16 {
        let mut admin = admin.clone();
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let key = format!("w{w}-{i}");
                match admin
                    .create_flag(pb::CreateFlagRequest {
                        flag: Some(flag("prod", &key)),
                        options: None,
                    })
                    .await
                {
                    Ok(response) => acked
                        .lock()
                        .unwrap()
                        .push((key, response.into_inner().revision)),
                    Err(_) => return,
                }
            }
        }));
    }
    // Readers: the newest revision any read showed. Reads answer only once what they saw is
    // durable, so no read may show a revision the crash takes back.
    let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut readers = Vec::new();
    for r in 0..2 {
        let mut admin = admin.clone();
        let seen = seen.clone();
        readers.push(tokio::spawn(async move {
            loop {
                let revision = if r == 0 {
                    match admin.list_namespaces(pb::ListNamespacesRequest {}).await {
                        Ok(answer) => answer.into_inner().revision,
                        Err(_) => return,
                    }
                } else {
                    let newest = admin
                        .list_history(pb::ListHistoryRequest {
                            namespace: "prod".into(),
                            page_size: 1,
                            ..Default::default()
                        })
                        .await;
                    match newest {
                        Ok(page) => page.into_inner().entries.first().map_or(0, |e| e.revision),
                        Err(_) => return,
                    }
                };
                seen.fetch_max(revision, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    // Kill in the middle of the stream of writes.
    while acked.lock().unwrap().len() < 1500 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    process.child.kill().unwrap();
    process.child.wait().unwrap();
    for task in writers.into_iter().chain(readers) {
        task.await.unwrap();
    }
    let seen = seen.load(std::sync::atomic::Ordering::Relaxed);
    let acked = acked.lock().unwrap().clone();
    drop(process);

    let process = Process::start(&data, &["--dev-no-auth"]);
    let mut admin = client(&process).await;
    for (key, revision) in &acked {
        let flag = admin
            .get_flag(pb::GetFlagRequest {
                namespace: "prod".into(),
                key: key.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("acknowledged flag {key} (revision {revision}) lost: {e}"))
            .into_inner();
        assert_eq!(flag.stamp.unwrap().created_revision, *revision);
    }
    // Every revision from 1 to the head is in the history, exactly once.
    let head = admin
        .list_namespaces(pb::ListNamespacesRequest {})
        .await
        .unwrap()
        .into_inner()
        .revision;
    assert!(head >= acked.iter().map(|a| a.1).max().unwrap());
    assert!(
        head >= seen,
        "a read showed revision {seen}, but only {head} survived the crash"
    );
    let mut revisions = Vec::new();
    let mut token = String::new();
    loop {
        let page = admin
            .list_history(pb::ListHistoryRequest {
                namespace: "prod".into(),
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        revisions.extend(page.entries.iter().map(|e| e.revision));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    revisions.reverse();
    assert_eq!(revisions, (1..=head).collect::<Vec<_>>());
    // Writing continues at head + 1.
    let next = admin
        .create_flag(pb::CreateFlagRequest {
            flag: Some(flag("prod", "after-crash")),
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.revision, head + 1);
    assert!(process.terminate().success());
}

#[test]
fn sigterm_stops_cleanly_and_bad_config_fails_fast() {
    let dir = TempDir::new("term");
    let process = Process::start(&dir.0.join("data"), &["--dev-no-auth"]);
    assert!(process.terminate().success());

    let check = |args: &[&str], message: &str| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_flagwrite"))
            .args(["--listen", "127.0.0.1:1", "--metrics-listen", "127.0.0.1:1"])
            .args(args)
            .env_remove("FLAGWRITE_TOKENS_FILE")
            .env_remove("FLAGWRITE_DEV_NO_AUTH")
            .output()
            .unwrap();
        assert!(!output.status.success(), "{args:?} should fail");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(message),
            "{stderr:?} should contain {message:?}"
        );
    };
    check(&[], "no --tokens-file");
    check(
        &["--dev-no-auth", "--log-format", "yaml"],
        "unknown log format \"yaml\"",
    );
    check(
        &["--dev-no-auth", "--changelog-retention", "lots"],
        "invalid value 'lots' for '--changelog-retention",
    );
    check(
        &["--tokens-file", "/nonexistent/tokens"],
        "cannot read tokens file /nonexistent/tokens",
    );
    check(
        &["--dev-no-auth", "--tls-cert", "/x.pem"],
        "--tls-cert and --tls-key",
    );
    let bad = dir.0.join("bad-tokens");
    std::fs::write(&bad, "ops superuser 0123456789abcdef\n").unwrap();
    check(
        &["--tokens-file", bad.to_str().unwrap()],
        "line 1: unknown scope",
    );
}
