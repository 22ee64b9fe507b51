//! Unleash data through write-time validation: states of the Unleash client
//! specification, imported with `unleash::import_features`, pass
//! `validate::bundle` unless they hold what Unleash silently turns off (bad
//! operands, unknown operators, empty lists, missing segments), which is
//! refused with the field path.
//!
//! Reads the specification from `UNLEASH_SPEC_DIR` or `shared/conformance/…`
//! beside the checkout, like `tests/unleash_spec.rs`.

use std::path::{Path, PathBuf};

use flagstream::{unleash, validate};

const SPEC_SUBDIR: &str = "shared/conformance/unleash-client-specification/specifications";

fn spec_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("UNLEASH_SPEC_DIR") {
        return Some(PathBuf::from(dir)).filter(|d| d.is_dir());
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .skip(1)
        .map(|a| a.join(SPEC_SUBDIR))
        .find(|d| d.is_dir())
}

/// What `check` expects when the whole state must be accepted.
const ACCEPTED: &str = "";

/// Imports the `state` of specification file `file` and expects
/// `validate::bundle` to accept it, or to refuse it with exactly `expected`.
#[track_caller]
fn check(dir: &Path, file: &str, expected: &str) {
    let text = std::fs::read_to_string(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    let spec: serde_json::Value = serde_json::from_str(&text).expect(file);
    let import = unleash::import_features(&spec["state"].to_string(), "production").expect(file);
    let got = match validate::bundle(&import.flags, &import.segments) {
        Ok(()) => String::new(),
        Err(err) => err.to_string(),
    };
    assert_eq!(got, expected, "{file}");
}

#[test]
fn specification_states() {
    let Some(dir) = spec_dir() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "Unleash specification folder not found (set UNLEASH_SPEC_DIR)"
        );
        eprintln!(
            "notice: Unleash specification folder not found; set UNLEASH_SPEC_DIR to run this test"
        );
        return;
    };
    for file in [
        "01-simple-examples.json",
        "02-user-with-id-strategy.json",
        "03-gradual-rollout-user-id-strategy.json",
        "04-gradual-rollout-session-id-strategy.json",
        "05-gradual-rollout-random-strategy.json",
        "07-multiple-strategies.json",
        "08-variants.json",
        "10-flexible-rollout-strategy.json",
        "18-utf8-flag-names.json",
    ] {
        check(&dir, file, ACCEPTED);
    }
    check(
        &dir,
        "06-remote-address-strategy.json",
        r#"flags[2].rules[0].constraints[0].values[1]: "192.invalid" is not an IP address or CIDR range"#,
    );
    check(
        &dir,
        "09-strategy-constraints.json",
        "flags[6].rules[0].constraints[0].values: at least one value is required",
    );
    check(
        &dir,
        "14-constraint-semver-operators.json",
        r#"flags[10].rules[0].constraints[0].values[0]: "v2.0.0" is not a semantic version"#,
    );
    check(
        &dir,
        "15-global-constraints.json",
        r#"flags[3].rules[0].segments[0]: no segment "segment-404" in namespace "production""#,
    );
    check(
        &dir,
        "21-regex-constraint-operators.json",
        r#"flags[1].rules[0].constraints[0].values[0]: "(regex" is not a valid regular expression: unclosed group"#,
    );
}
