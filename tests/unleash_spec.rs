//! Runs Unleash's client specification (every `*.json` of the folder named by
//! `UNLEASH_SPEC_DIR`, default `../shared/conformance/unleash-client-specification/specifications`
//! beside the checkout) through the importer and the engine, and asserts every
//! `tests` and `variantTests` case.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use flagstream::engine::{Context, FlagSet, parse};
use flagstream::unleash;
use serde_json::Value as Json;

const SPEC_SUBDIR: &str = "shared/conformance/unleash-client-specification/specifications";

/// The specification folder: `UNLEASH_SPEC_DIR` when set (and then only it),
/// else `../shared/…` beside the checkout. `None` when that folder is missing.
fn spec_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("UNLEASH_SPEC_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(SPEC_SUBDIR),
    };
    dir.is_dir().then_some(dir)
}

/// An Unleash context as the specification writes it, owned.
struct SpecContext {
    fields: HashMap<&'static str, String>,
    current_time_ms: Option<i64>,
    properties: HashMap<String, String>,
}

impl SpecContext {
    fn new(json: &Json) -> SpecContext {
        let mut ctx = SpecContext {
            fields: HashMap::new(),
            current_time_ms: None,
            properties: HashMap::new(),
        };
        let text = |v: &Json| match v {
            Json::String(s) => Some(s.clone()),
            Json::Null => None,
            other => Some(other.to_string()),
        };
        for (key, value) in json.as_object().into_iter().flatten() {
            match key.as_str() {
                "properties" => {
                    for (k, v) in value.as_object().into_iter().flatten() {
                        if let Some(v) = text(v) {
                            ctx.properties.insert(k.clone(), v);
                        }
                    }
                }
                "currentTime" => {
                    ctx.current_time_ms = text(value).as_deref().and_then(parse::date_ms)
                }
                "userId" | "sessionId" | "remoteAddress" | "environment" | "appName" => {
                    let name = [
                        "userId",
                        "sessionId",
                        "remoteAddress",
                        "environment",
                        "appName",
                    ]
                    .into_iter()
                    .find(|n| n == key)
                    .unwrap();
                    if let Some(v) = text(value) {
                        ctx.fields.insert(name, v);
                    }
                }
                // Unleash SDKs read unknown top-level fields as properties.
                other => {
                    if let Some(v) = text(value) {
                        ctx.properties.entry(other.to_string()).or_insert(v);
                    }
                }
            }
        }
        // Unleash SDKs read a well-known field from the properties when it is
        // not set at the top level.
        for name in [
            "userId",
            "sessionId",
            "remoteAddress",
            "environment",
            "appName",
        ] {
            if !ctx.fields.contains_key(name)
                && let Some(v) = ctx.properties.get(name)
            {
                ctx.fields.insert(name, v.clone());
            }
        }
        if ctx.current_time_ms.is_none() {
            ctx.current_time_ms = ctx
                .properties
                .get("currentTime")
                .and_then(|v| parse::date_ms(v));
        }
        ctx
    }

    fn view(&self) -> Context<'_> {
        let field = |name| self.fields.get(name).map_or("", String::as_str);
        Context {
            targeting_key: "",
            user_id: field("userId"),
            session_id: field("sessionId"),
            remote_address: field("remoteAddress"),
            environment: field("environment"),
            app_name: field("appName"),
            current_time_ms: self.current_time_ms,
            properties: Some(&self.properties),
        }
    }
}

fn load_state(state: &Json) -> FlagSet {
    let mut set = FlagSet::new();
    let json = state.to_string();
    if state.get("events").is_some() {
        unleash::apply_events(&json, "spec", &mut set).expect("events import");
    } else {
        let import = unleash::import_features(&json, "spec").expect("features import");
        for segment in import.segments {
            set.upsert_segment(segment);
        }
        for flag in import.flags {
            set.upsert_flag(flag);
        }
    }
    set
}

/// Runs one specification file; returns (passed, failures).
fn run_file(path: &Path) -> (usize, Vec<String>) {
    let doc: Json = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let set = load_state(&doc["state"]);
    let mut passed = 0;
    let mut failures = Vec::new();
    for case in doc["tests"].as_array().into_iter().flatten() {
        let ctx = SpecContext::new(&case["context"]);
        let toggle = case["toggleName"].as_str().unwrap_or_default();
        let actual = unleash::is_enabled(&set.evaluate(toggle, &ctx.view()));
        if Json::Bool(actual) == case["expectedResult"] {
            passed += 1;
        } else {
            failures.push(format!(
                "{}: {toggle}: expected {}, got {actual}",
                case["description"], case["expectedResult"]
            ));
        }
    }
    for case in doc["variantTests"].as_array().into_iter().flatten() {
        let ctx = SpecContext::new(&case["context"]);
        let toggle = case["toggleName"].as_str().unwrap_or_default();
        let v = unleash::variant(&set.evaluate(toggle, &ctx.view()));
        let expected = &case["expectedResult"];
        let ok = expected["name"] == Json::String(v.name.clone())
            && expected.get("payload").filter(|p| !p.is_null()) == v.payload.as_ref()
            && expected["enabled"] == Json::Bool(v.enabled)
            && expected
                .get("feature_enabled")
                .or(expected.get("featureEnabled"))
                .is_none_or(|f| *f == Json::Bool(v.feature_enabled));
        if ok {
            passed += 1;
        } else {
            failures.push(format!(
                "{}: {toggle}: expected {expected}, got {v:?}",
                case["description"]
            ));
        }
    }
    (passed, failures)
}

/// A plain `main` (the target has `harness = false`) so that the per-file
/// lines are always printed, not only when the test fails.
fn main() -> ExitCode {
    let Some(dir) = spec_dir() else {
        if std::env::var_os("CI").is_some() {
            eprintln!(
                "unleash_spec: the Unleash client specification folder is missing (set UNLEASH_SPEC_DIR)"
            );
            return ExitCode::FAILURE;
        }
        eprintln!(
            "NOTICE: Unleash client specification not found (set UNLEASH_SPEC_DIR or put it at ../{SPEC_SUBDIR}); skipping"
        );
        return ExitCode::SUCCESS;
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    if files.is_empty() {
        eprintln!("unleash_spec: no *.json in {}", dir.display());
        return ExitCode::FAILURE;
    }
    println!("Unleash client specification from {}", dir.display());
    let (mut total_passed, mut total_failed) = (0, 0);
    for file in &files {
        let (passed, failures) = run_file(file);
        let name = file.file_name().unwrap().to_string_lossy();
        println!("  {name}: {passed} passed, {} failed", failures.len());
        for f in &failures {
            println!("    FAILED {f}");
        }
        total_passed += passed;
        total_failed += failures.len();
    }
    println!(
        "unleash_spec: {} files, {total_passed} cases passed, {total_failed} failed",
        files.len()
    );
    if total_failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
