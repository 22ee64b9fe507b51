//! The fault suite: the real flagwrite and flagread binaries on 127.0.0.1 under kill -9 of the
//! writer with 16 concurrent writers, network faults between replicas and writer (cut, stall,
//! delay, half-open, flapping) through a proxy of the test's own, a writer outage under
//! evaluation load, and a writer restored from a backup. Each test ends with every replica
//! converged to the writer ([`cluster::converged`]) and prints one line of figures, prefixed
//! `faults:`, for the README's reliability table.
//!
//! The tests run one at a time (they measure time, and share two cores). More cycles:
//! `FLAGSTREAM_FAULT_CYCLES=100 cargo test -p flagread --test faults -- --nocapture`.

mod cluster;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster::{ADMIN, ADMIN_READ, Dir, EVAL, ReplicaOptions, Writer, authed, converged};
use flagstream::pb;
use flagstream::pb::flag_admin_client::FlagAdminClient;
use tonic::transport::Channel;

/// One test at a time: they measure convergence times and kill processes.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The replicas' `--upstream-silence-s` and `--backoff-max-ms` in the suite.
const SILENCE: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_millis(500);

/// The replicas' options in the suite: the silence limit and backoff cap above.
fn suite_options() -> ReplicaOptions {
    ReplicaOptions {
        silence_s: SILENCE.as_secs(),
        backoff_max_ms: BACKOFF_CAP.as_millis() as u64,
        ..Default::default()
    }
}

/// An acknowledged write: namespace, flag key, the revision it was acknowledged with.
type Acked = (String, String, u64);

/// A valid boolean flag (variants `on`/`off`).
fn flag(namespace: &str, key: &str) -> pb::Flag {
    let variant = |name: &str, value: bool| pb::Variant {
        name: name.into(),
        value: Some(pb::TypedValue {
            kind: Some(pb::typed_value::Kind::BoolValue(value)),
        }),
        description: String::new(),
    };
    pb::Flag {
        namespace: namespace.into(),
        key: key.into(),
        r#type: pb::FlagType::Boolean as i32,
        variants: vec![variant("on", true), variant("off", false)],
        enabled: true,
        disabled_variant: "off".into(),
        default_variant: "on".into(),
        ..Default::default()
    }
}

async fn create_namespace(admin: &mut FlagAdminClient<Channel>, key: &str) -> u64 {
    let namespace = pb::Namespace {
        key: key.into(),
        ..Default::default()
    };
    admin
        .create_namespace(authed(
            pb::CreateNamespaceRequest {
                namespace: Some(namespace),
                options: None,
            },
            ADMIN,
        ))
        .await
        .unwrap()
        .into_inner()
        .revision
}

async fn create_flag(
    admin: &mut FlagAdminClient<Channel>,
    namespace: &str,
    key: &str,
) -> Result<u64, tonic::Status> {
    admin
        .create_flag(authed(
            pb::CreateFlagRequest {
                flag: Some(flag(namespace, key)),
                options: None,
            },
            ADMIN,
        ))
        .await
        .map(|r| r.into_inner().revision)
}

async fn create_segment(
    admin: &mut FlagAdminClient<Channel>,
    namespace: &str,
    key: &str,
) -> Result<u64, tonic::Status> {
    let segment = pb::Segment {
        namespace: namespace.into(),
        key: key.into(),
        constraints: vec![pb::Constraint {
            attribute: "plan".into(),
            operator: pb::Operator::In as i32,
            values: vec!["pro".into()],
            inverted: false,
            case_insensitive: false,
        }],
        ..Default::default()
    };
    admin
        .create_segment(authed(
            pb::CreateSegmentRequest {
                segment: Some(segment),
                options: None,
            },
            ADMIN,
        ))
        .await
        .map(|r| r.into_inner().revision)
}

async fn set_enabled(
    admin: &mut FlagAdminClient<Channel>,
    namespace: &str,
    key: &str,
    enabled: bool,
) -> Result<u64, tonic::Status> {
    admin
        .set_flag_enabled(authed(
            pb::SetFlagEnabledRequest {
                namespace: namespace.into(),
                key: key.into(),
                enabled,
                ..Default::default()
            },
            ADMIN,
        ))
        .await
        .map(|r| r.into_inner().revision)
}

/// Flag key → created revision, over `namespaces` on the writer.
async fn created_revisions(
    writer: &Writer,
    namespaces: &[&str],
) -> std::collections::HashMap<(String, String), u64> {
    let mut admin = writer.admin().await;
    let mut out = std::collections::HashMap::new();
    for namespace in namespaces {
        let export = admin
            .export_namespace(authed(
                pb::ExportNamespaceRequest {
                    namespace: namespace.to_string(),
                },
                ADMIN_READ,
            ))
            .await
            .unwrap()
            .into_inner();
        for f in export.bundle.unwrap_or_default().flags {
            let created = f.stamp.map_or(0, |s| s.created_revision);
            out.insert((namespace.to_string(), f.key), created);
        }
    }
    out
}

/// The revisions above `after` in the history of `namespaces`, sorted.
async fn history_after(writer: &Writer, namespaces: &[&str], after: u64) -> Vec<u64> {
    let mut admin = writer.admin().await;
    let mut revisions = Vec::new();
    for namespace in namespaces {
        let mut token = String::new();
        'pages: loop {
            let page = admin
                .list_history(authed(
                    pb::ListHistoryRequest {
                        namespace: namespace.to_string(),
                        page_size: 1000,
                        page_token: token,
                        ..Default::default()
                    },
                    ADMIN_READ,
                ))
                .await
                .unwrap()
                .into_inner();
            // Newest first: stop at the first revision already checked.
            for entry in &page.entries {
                if entry.revision <= after {
                    break 'pages;
                }
                revisions.push(entry.revision);
            }
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
    }
    revisions.sort_unstable();
    revisions
}

/// kill -9 of the writer while 16 clients write (flags, segments, a kill switch),
/// `FLAGSTREAM_FAULT_CYCLES` times (20 by default), with two replicas following (one of every
/// namespace, one of `prod` only). After each restart: every acknowledged flag creation is
/// there with the revision it was acknowledged with,
/// the revisions since the last check have no gap and no duplicate, and both replicas converge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_kill_9_under_16_writers() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let cycles = cluster::cycles(20);
    let dir = Dir::new("kill9");
    let mut writer = dir.writer();
    writer.start().await;
    let mut admin = writer.admin().await;
    create_namespace(&mut admin, "prod").await;
    create_namespace(&mut admin, "other").await;
    create_flag(&mut admin, "prod", "toggle").await.unwrap();
    let mut all = dir.replica("all", &writer.url(), suite_options());
    let prod_only = ReplicaOptions {
        namespaces: vec!["prod".into()],
        ..suite_options()
    };
    let mut prod = dir.replica("prod", &writer.url(), prod_only);
    all.start();
    prod.start();
    all.serving().await;
    prod.serving().await;

    let namespaces = ["prod", "other"];
    let mut acked: Vec<Acked> = Vec::new();
    // Acknowledged segment creations and kill-switch writes (checked by the digest).
    let other_acked = Arc::new(AtomicU64::new(0));
    let mut lost = std::collections::BTreeSet::new();
    let (mut divergent, mut gaps) = (0usize, 0usize);
    let mut checked = 0u64;
    let mut slowest = Duration::ZERO;
    for cycle in 0..cycles {
        let admin = writer.admin().await;
        let got: Arc<Mutex<Vec<Acked>>> = Arc::default();
        let mut clients = Vec::new();
        for w in 0..16 {
            let mut admin = admin.clone();
            let got = got.clone();
            let other_acked = other_acked.clone();
            // Client 14 creates segments in `other` and client 15 switches `prod/toggle` on and
            // off (both compared by the digest); the others create flags, one in four of them
            // in `other`.
            let namespace = if w % 4 == 3 { "other" } else { "prod" };
            clients.push(tokio::spawn(async move {
                for i in 0..5_000 {
                    let key = format!("c{cycle}-w{w}-{i}");
                    let written = match w {
                        14 => create_segment(&mut admin, "other", &key)
                            .await
                            .map(|_| other_acked.fetch_add(1, Ordering::Relaxed))
                            .map(drop),
                        15 => set_enabled(&mut admin, "prod", "toggle", i % 2 == 0)
                            .await
                            .map(|_| other_acked.fetch_add(1, Ordering::Relaxed))
                            .map(drop),
                        _ => create_flag(&mut admin, namespace, &key)
                            .await
                            .map(|revision| {
                                got.lock().unwrap().push((namespace.into(), key, revision))
                            }),
                    };
                    if written.is_err() {
                        return;
                    }
                }
            }));
        }
        // Kill at a random point of the stream of writes.
        let target = 30 + fastrand::usize(..90);
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.lock().unwrap().len() < target {
            assert!(Instant::now() < deadline, "cycle {cycle}: writes stalled");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        writer.kill9();
        for client in clients {
            client.await.unwrap();
        }
        acked.extend(got.lock().unwrap().drain(..));
        writer.start().await;

        // No acknowledged write lost: each is there, created at the revision acknowledged.
        let stored = created_revisions(&writer, &namespaces).await;
        for (namespace, key, revision) in &acked {
            let found = stored.get(&(namespace.clone(), key.clone()));
            if found != Some(revision) && lost.insert(key.clone()) {
                eprintln!(
                    "cycle {cycle}: acknowledged {namespace}/{key} at revision {revision}, found {found:?}"
                );
            }
        }
        // Gap-free: the revisions since the last check are exactly checked+1..=head.
        let head = writer.head().await;
        let revisions = history_after(&writer, &namespaces, checked).await;
        if revisions != (checked + 1..=head).collect::<Vec<_>>() {
            gaps += 1;
            eprintln!(
                "cycle {cycle}: history from {} to {head} has {} revisions: {revisions:?}",
                checked + 1,
                revisions.len()
            );
        }
        checked = head;
        match converged(&writer, &[&all, &prod], Duration::from_secs(15)).await {
            Ok(took) => slowest = slowest.max(took),
            Err(why) => {
                divergent += 1;
                eprintln!("cycle {cycle}: {why}");
            }
        }
    }
    println!(
        "faults: kill -9 under 16 writers: cycles={cycles} acknowledged={} flag_creations={} lost={} gaps={gaps} divergent={divergent} slowest_convergence_ms={} run_s={:.1}",
        acked.len() as u64 + other_acked.load(Ordering::Relaxed),
        acked.len(),
        lost.len(),
        slowest.as_millis(),
        started.elapsed().as_secs_f64()
    );
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert_eq!(gaps, 0, "revisions with gaps or duplicates");
    assert_eq!(divergent, 0, "replicas that did not converge");
    assert!(all.alive() && prod.alive());
    writer.terminate();
}

/// The writer is down (kill -9) for several silence limits while replicas serve a steady
/// evaluation load: not one evaluation fails, and when the writer returns the replicas resume
/// from their revision, without a full snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_outage_under_evaluation_load() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let dir = Dir::new("outage");
    let mut writer = dir.writer();
    writer.start().await;
    let mut admin = writer.admin().await;
    create_namespace(&mut admin, "demo").await;
    for i in 0..20 {
        create_flag(&mut admin, "demo", &format!("f{i}"))
            .await
            .unwrap();
    }
    let mut replicas = vec![
        dir.replica("r0", &writer.url(), suite_options()),
        dir.replica("r1", &writer.url(), suite_options()),
    ];
    for r in &mut replicas {
        r.start();
    }
    for r in &replicas {
        r.serving().await;
    }
    converged(
        &writer,
        &[&replicas[0], &replicas[1]],
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let mut snapshots_before = Vec::new();
    for r in &replicas {
        snapshots_before.push(r.metric("flagread_snapshots_applied_total").await);
    }

    // Steady load: two clients per replica, Evaluate and EvaluateAll in turn.
    let stop = Arc::new(AtomicBool::new(false));
    let outage = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let ok_during_outage = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for r in &replicas {
        for _ in 0..2 {
            let mut eval = r.eval().await;
            let (stop, outage, ok, ok_during_outage, failed) = (
                stop.clone(),
                outage.clone(),
                ok.clone(),
                ok_during_outage.clone(),
                failed.clone(),
            );
            load.push(tokio::spawn(async move {
                for i in 0..1_000_000u64 {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let result = if i % 2 == 0 {
                        let request = pb::EvaluateRequest {
                            namespace: "demo".into(),
                            flag_key: format!("f{}", i % 20),
                            ..Default::default()
                        };
                        eval.evaluate(authed(request, EVAL)).await.map(|_| ())
                    } else {
                        let request = pb::EvaluateAllRequest {
                            namespace: "demo".into(),
                            ..Default::default()
                        };
                        eval.evaluate_all(authed(request, EVAL)).await.map(|_| ())
                    };
                    match result {
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            if outage.load(Ordering::Relaxed) {
                                ok_during_outage.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(status) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            eprintln!("evaluation failed: {status}");
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The writer is down for three silence limits.
    outage.store(true, Ordering::Relaxed);
    writer.kill9();
    let down = Instant::now();
    for r in &replicas {
        let deadline = Instant::now() + Duration::from_secs(10);
        while r.metric("flagread_connected").await != 0 {
            assert!(Instant::now() < deadline, "{} never noticed", r.name);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tokio::time::sleep((SILENCE * 3).saturating_sub(down.elapsed())).await;
    let outage_s = down.elapsed().as_secs_f64();
    writer.start().await;
    outage.store(false, Ordering::Relaxed);
    let mut admin = writer.admin().await;
    create_flag(&mut admin, "demo", "after-outage")
        .await
        .unwrap();
    let converge = converged(
        &writer,
        &[&replicas[0], &replicas[1]],
        Duration::from_secs(10),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let mut snapshots = Vec::new();
    let mut subscriptions = Vec::new();
    for r in &replicas {
        snapshots.push(r.metric("flagread_snapshots_applied_total").await);
        subscriptions.push(r.metric("flagread_subscriptions_total").await);
    }
    let (ok, ok_during_outage, failed) = (
        ok.load(Ordering::Relaxed),
        ok_during_outage.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    println!(
        "faults: writer outage under load: outage_s={outage_s:.1} evaluations={ok} during_outage={ok_during_outage} failed={failed} snapshots_after_resume={:?} divergent={} run_s={:.1}",
        snapshots
            .iter()
            .zip(&snapshots_before)
            .map(|(a, b)| a - b)
            .collect::<Vec<_>>(),
        usize::from(converge.is_err()),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(failed, 0, "evaluations failed");
    assert!(ok_during_outage > 0, "no evaluation ran during the outage");
    converge.unwrap();
    assert_eq!(
        snapshots, snapshots_before,
        "a replica took a full snapshot to resume"
    );
    assert!(
        subscriptions.iter().all(|s| *s >= 2),
        "every replica subscribed again: {subscriptions:?}"
    );
    writer.terminate();
}

/// Time given beyond the silence limit plus the backoff cap for a replica to converge after a
/// network fault heals: the convergence check's own polling (25 ms) and round trips, and
/// scheduling on two cores shared with the rest of the build.
const HEAL_SLACK: Duration = Duration::from_millis(1500);

/// Writes in a loop until `stop`, one every few milliseconds; counts the acknowledged ones and
/// records them in `log`.
fn write_until(
    mut admin: FlagAdminClient<Channel>,
    tag: &'static str,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    log: Arc<Mutex<Vec<Acked>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for i in 0..10_000 {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let namespace = if i % 3 == 0 { "other" } else { "prod" };
            let key = format!("{tag}-{i}");
            if let Ok(revision) = create_flag(&mut admin, namespace, &key).await {
                acked.fetch_add(1, Ordering::Relaxed);
                log.lock().unwrap().push((namespace.into(), key, revision));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
}

/// Network faults between the replicas and the writer, through the test's own TCP proxy: cut,
/// a stall longer than the silence limit, added latency, a half-open path and flapping.
/// Writes go on during each fault; once it heals, every replica converges within the silence
/// limit plus the backoff cap (plus [`HEAL_SLACK`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_faults_heal_within_silence_plus_backoff() {
    use cluster::proxy::{Fault, Proxy};
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let dir = Dir::new("net");
    let mut writer = dir.writer();
    writer.start().await;
    let mut admin = writer.admin().await;
    create_namespace(&mut admin, "prod").await;
    create_namespace(&mut admin, "other").await;
    let proxy = Proxy::start(([127, 0, 0, 1], writer.port).into()).await;
    let options = suite_options();
    let mut a = dir.replica("a", &proxy.url, options.clone());
    let mut b = dir.replica(
        "b",
        &proxy.url,
        ReplicaOptions {
            namespaces: vec!["prod".into()],
            ..options
        },
    );
    a.start();
    b.start();
    a.serving().await;
    b.serving().await;
    converged(&writer, &[&a, &b], Duration::from_secs(10))
        .await
        .unwrap();

    let budget = SILENCE + BACKOFF_CAP + HEAL_SLACK;
    let faults: [(&'static str, Fault, Duration); 5] = [
        ("cut", Fault::Cut, Duration::from_secs(2)),
        (
            "stall",
            Fault::Stall,
            SILENCE * 2 + Duration::from_millis(500),
        ),
        (
            "delay",
            Fault::Delay(Duration::from_millis(200)),
            Duration::from_secs(2),
        ),
        (
            "half-open",
            Fault::HalfOpen,
            SILENCE * 2 + Duration::from_millis(500),
        ),
        ("flapping", Fault::None, Duration::ZERO),
    ];
    let mut total_acked = 0;
    let log: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let mut figures = Vec::new();
    let mut failures = Vec::new();
    for (name, fault, hold) in faults {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let writes = write_until(
            writer.admin().await,
            name,
            stop.clone(),
            acked.clone(),
            log.clone(),
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        if name == "flapping" {
            // Cut for 200 ms, whole for 250 ms, eight times.
            cluster::proxy::flap(
                &proxy,
                8,
                Duration::from_millis(200),
                Duration::from_millis(250),
            )
            .await;
        } else {
            proxy.set(fault);
            tokio::time::sleep(hold).await;
        }
        let during = acked.load(Ordering::Relaxed);
        proxy.set(Fault::None);
        let healed = Instant::now();
        stop.store(true, Ordering::Relaxed);
        writes.await.unwrap();
        let acked = acked.load(Ordering::Relaxed);
        total_acked += acked;
        if during == 0 {
            failures.push(format!(
                "{name}: no write was acknowledged during the fault"
            ));
        }
        match converged(&writer, &[&a, &b], Duration::from_secs(40)).await {
            Ok(_) => {
                let took = healed.elapsed();
                figures.push(format!("{name}={}ms", took.as_millis()));
                if took > budget {
                    failures.push(format!(
                        "{name}: converged {took:?} after healing, over the {budget:?} budget"
                    ));
                }
            }
            Err(why) => {
                figures.push(format!("{name}=never"));
                failures.push(format!("{name}: {why}"));
            }
        }
    }
    // Every acknowledged write is on the writer, and so (converged) on the replicas.
    let stored = created_revisions(&writer, &["prod", "other"]).await;
    let lost = log
        .lock()
        .unwrap()
        .iter()
        .filter(|(ns, key, revision)| stored.get(&(ns.clone(), key.clone())) != Some(revision))
        .count();
    if lost > 0 {
        failures.push(format!("{lost} acknowledged writes lost"));
    }
    let divergent = figures.iter().filter(|f| f.ends_with("=never")).count();
    let late = failures.iter().filter(|f| f.contains("budget")).count();
    println!(
        "faults: network faults: faults=5 acknowledged={total_acked} lost={lost} divergent={divergent} late={late} heal_to_converged[{}] budget_ms={} run_s={:.1}",
        figures.join(" "),
        budget.as_millis(),
        started.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(a.alive() && b.alive());
    writer.terminate();
}

/// Copies a directory tree.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The writer is restored from a backup of its data directory: copied while stopped at
/// revision N, it went on to N+3 with the replicas following, and is then restored and writes
/// new revisions: two (its head stays below the replicas'), three (its head is theirs, at
/// another history) or four (its head passes theirs). In each case one replica keeps running
/// (cut off by the proxy until the restored writer has written), one (following namespace `a`
/// only) is restarted from its snapshot file. Both must notice that the history changed and
/// resync: converge to the writer, and serve none of the flags of the lost history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_restored_from_backup_resyncs_replicas() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let mut figures = Vec::new();
    let mut failures = Vec::new();
    for new_writes in [2, 3, 4] {
        let (divergent, ghosts, resynced) = restore_once(new_writes).await;
        figures.push(format!(
            "new_writes={new_writes}:divergent={},ghost_flags={},live_replica_snapshots={resynced}",
            divergent.len(),
            ghosts.len()
        ));
        failures.extend(
            divergent
                .into_iter()
                .chain(ghosts)
                .map(|f| format!("{new_writes} new writes: {f}")),
        );
    }
    let divergent = failures
        .iter()
        .filter(|f| f.contains("not converged"))
        .count();
    println!(
        "faults: writer restored from a backup: restores=3 replicas=2 divergent={divergent} [{}] run_s={:.1}",
        figures.join(" "),
        started.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{failures:#?}");
}

/// One restore (see [`writer_restored_from_backup_resyncs_replicas`]) followed by
/// `new_writes` writes: the replicas that did not converge, the lost flags still served, and
/// how many snapshots the live replica took.
async fn restore_once(new_writes: usize) -> (Vec<String>, Vec<String>, i64) {
    use cluster::proxy::{Fault, Proxy};
    let dir = Dir::new("restore");
    let mut writer = dir.writer();
    writer.start().await;
    let mut admin = writer.admin().await;
    create_namespace(&mut admin, "a").await;
    create_namespace(&mut admin, "b").await;
    create_flag(&mut admin, "a", "kept").await.unwrap();
    create_flag(&mut admin, "b", "kept").await.unwrap();
    // The live replica follows through a proxy, cut while the writer is restored, so that it
    // comes back only once the restored writer has written.
    let proxy = Proxy::start(([127, 0, 0, 1], writer.port).into()).await;
    let mut live = dir.replica(
        "live",
        &proxy.url,
        ReplicaOptions {
            snapshot_file: true,
            ..suite_options()
        },
    );
    let mut restarted = dir.replica(
        "restarted",
        &writer.url(),
        ReplicaOptions {
            namespaces: vec!["a".into()],
            snapshot_file: true,
            ..suite_options()
        },
    );
    live.start();
    restarted.start();
    live.serving().await;
    restarted.serving().await;
    converged(&writer, &[&live, &restarted], Duration::from_secs(10))
        .await
        .unwrap();

    // The backup, taken while the writer is stopped at revision N.
    let backed_up_at = writer.head().await;
    writer.terminate();
    let backup = dir.0.join("backup");
    copy_dir(&writer.data, &backup);

    // The history the backup does not have: N+1..=N+3.
    writer.start().await;
    let mut admin = writer.admin().await;
    for (ns, key) in [("a", "lost-1"), ("b", "lost-2"), ("a", "lost-3")] {
        create_flag(&mut admin, ns, key).await.unwrap();
    }
    converged(&writer, &[&live, &restarted], Duration::from_secs(10))
        .await
        .unwrap();
    // Let the snapshot files catch up (written at most every 50 ms), then stop one replica.
    tokio::time::sleep(Duration::from_millis(500)).await;
    restarted.kill9();
    let snapshots_before = live.metric("flagread_snapshots_applied_total").await;
    proxy.set(Fault::Cut);
    writer.terminate();

    // Restore, and write new revisions: N+1.. of another history.
    std::fs::remove_dir_all(&writer.data).unwrap();
    copy_dir(&backup, &writer.data);
    writer.start().await;
    assert_eq!(writer.head().await, backed_up_at);
    let mut admin = writer.admin().await;
    let news = [
        ("a", "new-1"),
        ("b", "new-2"),
        ("a", "new-3"),
        ("b", "new-4"),
    ];
    for (ns, key) in &news[..new_writes] {
        create_flag(&mut admin, ns, key).await.unwrap();
    }
    proxy.set(Fault::None);
    restarted.start();
    let mut divergent = Vec::new();
    for replica in [&live, &restarted] {
        if let Err(why) = converged(&writer, &[replica], Duration::from_secs(15)).await {
            divergent.push(format!("{}: {why}", replica.name));
        }
    }

    // Whatever the checker says, no replica may serve a flag of the lost history.
    let mut ghosts = Vec::new();
    for replica in [&live, &restarted] {
        let mut eval = replica.eval().await;
        for (ns, key) in [("a", "lost-1"), ("b", "lost-2"), ("a", "lost-3")] {
            if !replica.namespaces.is_empty() && !replica.namespaces.iter().any(|n| n == ns) {
                continue;
            }
            let request = pb::EvaluateRequest {
                namespace: ns.into(),
                flag_key: key.into(),
                ..Default::default()
            };
            if eval.evaluate(authed(request, EVAL)).await.is_ok() {
                ghosts.push(format!("{} serves {ns}/{key}", replica.name));
            }
        }
    }
    let resynced = live.metric("flagread_snapshots_applied_total").await - snapshots_before;
    writer.terminate();
    (divergent, ghosts, resynced)
}

/// A flag whose variant `on` serves `value` (of `kind`) and `off` serves `off`.
fn valued_flag(
    namespace: &str,
    key: &str,
    r#type: pb::FlagType,
    on: pb::typed_value::Kind,
    off: pb::typed_value::Kind,
) -> pb::Flag {
    let variant = |name: &str, kind| pb::Variant {
        name: name.into(),
        value: Some(pb::TypedValue { kind: Some(kind) }),
        description: String::new(),
    };
    pb::Flag {
        namespace: namespace.into(),
        key: key.into(),
        r#type: r#type as i32,
        variants: vec![variant("on", on), variant("off", off)],
        enabled: true,
        disabled_variant: "off".into(),
        default_variant: "on".into(),
        ..Default::default()
    }
}

/// JSON `depth` levels deep, objects and arrays as `shape` says, as a protobuf value.
fn deep_json(depth: usize, objects: bool) -> prost_types::Value {
    use prost_types::value::Kind;
    (0..depth).fold(
        prost_types::Value {
            kind: Some(Kind::StringValue("bottom".into())),
        },
        |inner, _| prost_types::Value {
            kind: Some(if objects {
                Kind::StructValue(prost_types::Struct {
                    fields: [("k".to_string(), inner)].into(),
                })
            } else {
                Kind::ListValue(prost_types::ListValue {
                    values: vec![inner],
                })
            }),
        },
    )
}

/// Whatever the writer accepts, every replica applies: the deepest JSON of both shapes and the
/// longest string the limits allow, written through the real writer, reach a replica that
/// follows the change stream and one that starts from a snapshot, and evaluate to exactly what
/// was written. One level deeper is refused by name and stops nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_values_the_limits_allow_are_applied_on_every_replica() {
    use pb::typed_value::Kind;
    let _serial = SERIAL.lock().await;
    let dir = Dir::new("limits");
    let mut writer = dir.writer();
    writer.start().await;
    let mut admin = writer.admin().await;
    create_namespace(&mut admin, "limits").await;
    let mut live = dir.replica("live", &writer.url(), suite_options());
    live.start();
    live.serving().await;

    let depth = flagstream::validate::MAX_JSON_DEPTH;
    let long = "x".repeat(flagstream::validate::MAX_STRING_VALUE_BYTES);
    let flags = [
        valued_flag(
            "limits",
            "deep-objects",
            pb::FlagType::Json,
            Kind::JsonValue(deep_json(depth, true)),
            Kind::JsonValue(deep_json(1, true)),
        ),
        valued_flag(
            "limits",
            "deep-arrays",
            pb::FlagType::Json,
            Kind::JsonValue(deep_json(depth, false)),
            Kind::JsonValue(deep_json(1, false)),
        ),
        valued_flag(
            "limits",
            "long-string",
            pb::FlagType::String,
            Kind::StringValue(long.clone()),
            Kind::StringValue(String::new()),
        ),
    ];
    for flag in &flags {
        admin
            .create_flag(authed(
                pb::CreateFlagRequest {
                    flag: Some(flag.clone()),
                    options: None,
                },
                ADMIN,
            ))
            .await
            .unwrap_or_else(|s| panic!("{} refused: {s}", flag.key));
    }
    let too_deep = valued_flag(
        "limits",
        "too-deep",
        pb::FlagType::Json,
        Kind::JsonValue(deep_json(depth + 1, true)),
        Kind::JsonValue(deep_json(1, true)),
    );
    let refused = admin
        .create_flag(authed(
            pb::CreateFlagRequest {
                flag: Some(too_deep),
                options: None,
            },
            ADMIN,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("json_value"), "{refused:?}");

    let mut fresh = dir.replica("fresh", &writer.url(), suite_options());
    fresh.start();
    fresh.serving().await;
    converged(&writer, &[&live, &fresh], Duration::from_secs(10))
        .await
        .unwrap();
    for replica in [&live, &fresh] {
        assert_eq!(replica.metric("flagread_stuck_revision").await, 0);
        let mut eval = replica.eval().await;
        for flag in &flags {
            let answer = eval
                .evaluate(authed(
                    pb::EvaluateRequest {
                        namespace: "limits".into(),
                        flag_key: flag.key.clone(),
                        ..Default::default()
                    },
                    EVAL,
                ))
                .await
                .unwrap_or_else(|s| panic!("{}: {s}", flag.key))
                .into_inner();
            assert_eq!(answer.value, flag.variants[0].value, "{}", flag.key);
        }
    }
}
