//! End to end with the real grpcurl 1.8.6 and the real binary, through server
//! reflection only (no proto files): list, describe, create a namespace and a
//! flag from JSON, read it back, see the history. The README's admin examples
//! are exactly these commands (with the address `localhost:50051`).

mod common;

use std::process::Command;

use common::TempDir;
use common::process::Process;

const TOKEN: &str = "ops-secret-0123456789abcdef";

/// The grpcurl to use: `FLAGSTREAM_GRPCURL`, else `grpcurl` on PATH. `None`
/// (after a notice) when there is none and `CI` is unset.
fn grpcurl() -> Option<String> {
    let candidate = std::env::var("FLAGSTREAM_GRPCURL").unwrap_or_else(|_| "grpcurl".to_string());
    match Command::new(&candidate).arg("-version").output() {
        Ok(output) if output.status.success() => Some(candidate),
        _ if std::env::var_os("CI").is_some() => {
            panic!("grpcurl not found ({candidate}); run scripts/test.sh")
        }
        _ => {
            eprintln!(
                "NOTICE: grpcurl not found ({candidate}); skipping the grpcurl end-to-end test (scripts/test.sh installs it)"
            );
            None
        }
    }
}

/// Runs one grpcurl command line (as written in the README, with `ADDR` for
/// the address and `$TOKEN` for the token) and returns its stdout.
fn check(grpcurl: &str, addr: &str, command: &str, expected: &[&str]) -> String {
    let words = shell_words(command);
    assert_eq!(words[0], "grpcurl");
    let args: Vec<String> = words[1..]
        .iter()
        .map(|w| w.replace("localhost:50051", addr).replace("$TOKEN", TOKEN))
        .collect();
    let output = Command::new(grpcurl).args(&args).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "{command}\nfailed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    for fragment in expected {
        assert!(
            stdout.contains(fragment),
            "{command}\noutput lacks {fragment:?}:\n{stdout}"
        );
    }
    stdout
}

/// Splits a command line on spaces, honouring single and double quotes
/// (enough for the README's commands).
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quote = None;
    let mut in_word = false;
    for c in line.chars() {
        match (quote, c) {
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (Some(q), c) if c == q => quote = None,
            (None, ' ') => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (_, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

#[test]
fn admin_through_reflection_with_grpcurl() {
    let Some(grpcurl) = grpcurl() else { return };
    let dir = TempDir::new("grpcurl");
    let tokens = dir.0.join("tokens");
    std::fs::write(&tokens, format!("ops admin {TOKEN}\n")).unwrap();
    let process = Process::start(
        &dir.0.join("data"),
        &["--tokens-file", tokens.to_str().unwrap()],
    );
    let addr = process.addr.to_string();

    let services = check(
        &grpcurl,
        &addr,
        "grpcurl -plaintext localhost:50051 list",
        &[
            "flagstream.v1.FlagAdmin",
            "flagstream.v1.Replication",
            "grpc.health.v1.Health",
        ],
    );
    assert!(
        !services.contains("FlagEval"),
        "flagwrite does not serve FlagEval:\n{services}"
    );
    check(
        &grpcurl,
        &addr,
        "grpcurl -plaintext localhost:50051 describe flagstream.v1.FlagAdmin",
        &["rpc CreateFlag", "rpc ListHistory"],
    );
    check(
        &grpcurl,
        &addr,
        "grpcurl -plaintext localhost:50051 describe flagstream.v1.Flag",
        &["disabled_variant"],
    );
    check(
        &grpcurl,
        &addr,
        r#"grpcurl -plaintext -H "authorization: Bearer $TOKEN" -d '{"namespace": {"key": "production", "description": "Live traffic"}}' localhost:50051 flagstream.v1.FlagAdmin/CreateNamespace"#,
        &[r#""revision": "1""#],
    );
    check(
        &grpcurl,
        &addr,
        r#"grpcurl -plaintext -H "authorization: Bearer $TOKEN" -d '{"flag": {"namespace": "production", "key": "new-checkout", "type": "FLAG_TYPE_BOOLEAN", "variants": [{"name": "on", "value": {"boolValue": true}}, {"name": "off", "value": {"boolValue": false}}], "enabled": true, "disabledVariant": "off", "defaultVariant": "off", "rules": [{"name": "beta users", "constraints": [{"attribute": "plan", "operator": "OPERATOR_IN", "values": ["beta"]}], "serve": {"variant": "on"}}]}, "options": {"comment": "launch to beta"}}' localhost:50051 flagstream.v1.FlagAdmin/CreateFlag"#,
        &[r#""revision": "2""#, r#""key": "new-checkout""#],
    );
    check(
        &grpcurl,
        &addr,
        r#"grpcurl -plaintext -H "authorization: Bearer $TOKEN" -d '{"namespace": "production", "key": "new-checkout"}' localhost:50051 flagstream.v1.FlagAdmin/GetFlag"#,
        &[
            r#""defaultVariant": "off""#,
            r#""updatedBy": "ops""#,
            "OPERATOR_IN",
        ],
    );
    check(
        &grpcurl,
        &addr,
        r#"grpcurl -plaintext -H "authorization: Bearer $TOKEN" -d '{"namespace": "production", "key": "new-checkout", "enabled": false}' localhost:50051 flagstream.v1.FlagAdmin/SetFlagEnabled"#,
        &[r#""revision": "3""#],
    );
    check(
        &grpcurl,
        &addr,
        r#"grpcurl -plaintext -H "authorization: Bearer $TOKEN" -d '{"namespace": "production", "kind": "OBJECT_KIND_FLAG", "key": "new-checkout"}' localhost:50051 flagstream.v1.FlagAdmin/ListHistory"#,
        &[
            r#""operation": "SetFlagEnabled""#,
            r#""operation": "CreateFlag""#,
            r#""comment": "launch to beta""#,
            r#""actor": "ops""#,
        ],
    );
    check(
        &grpcurl,
        &addr,
        "grpcurl -plaintext localhost:50051 grpc.health.v1.Health/Check",
        &["SERVING"],
    );
    assert!(process.terminate().success());
}

#[test]
fn serves_tls_with_a_certificate_from_pem_files() {
    let Some(grpcurl) = grpcurl() else { return };
    let dir = TempDir::new("tls");
    let (cert, key) = (dir.0.join("cert.pem"), dir.0.join("key.pem"));
    // openssl only makes the test certificate; without it there is nothing
    // to serve, so the test says so and returns.
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output();
    if !made.is_ok_and(|o| o.status.success()) {
        eprintln!("NOTICE: openssl could not make a test certificate; skipping the TLS test");
        return;
    }
    let process = Process::start(
        &dir.0.join("data"),
        &[
            "--dev-no-auth",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let addr = process.addr.to_string();
    let listed = Command::new(&grpcurl)
        .arg("-cacert")
        .arg(&cert)
        .arg(&addr)
        .arg("list")
        .output()
        .unwrap();
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert!(String::from_utf8_lossy(&listed.stdout).contains("flagstream.v1.FlagAdmin"));
    let plain = Command::new(&grpcurl)
        .args(["-plaintext", "-max-time", "3", &addr, "list"])
        .output()
        .unwrap();
    assert!(
        !plain.status.success(),
        "plaintext must be refused on a TLS port"
    );
    assert!(process.terminate().success());
}
