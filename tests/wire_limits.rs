//! Whatever the writer accepts can be decoded again wherever it travels: the
//! deepest JSON value the limits allow (`validate::MAX_JSON_DEPTH`) passes
//! through every wire message that carries a flag or a value — the admin
//! requests and answers, the replication stream's changes and snapshot chunks,
//! the history, evaluation results and Watch events — within prost's decoder
//! limit of 100 nested messages. One level deeper is refused by validation,
//! yet still decodes as a request, so the writer can answer INVALID_ARGUMENT
//! naming the field instead of failing to decode.

use flagstream::model::{self, FlagType, Stamp, Value, Variant};
use flagstream::pb;
use flagstream::validate::MAX_JSON_DEPTH;
use prost::Message;
use serde_json::json;

/// Objects nested `depth` levels, with a scalar inside the last.
fn objects(depth: usize) -> serde_json::Value {
    (0..depth).fold(json!(1), |inner, _| json!({ "k": inner }))
}

/// Arrays nested `depth` levels.
fn arrays(depth: usize) -> serde_json::Value {
    (0..depth).fold(json!("x"), |inner, _| json!([inner]))
}

/// Objects and arrays alternating, `depth` levels.
fn mixed(depth: usize) -> serde_json::Value {
    (0..depth).fold(json!(null), |inner, level| {
        if level % 2 == 0 {
            json!({ "k": inner })
        } else {
            json!([inner, 2])
        }
    })
}

/// An empty object at the deepest level: the costliest shape (a Struct with
/// no fields still is one more message than a scalar).
fn empty_innermost(depth: usize) -> serde_json::Value {
    (1..depth).fold(json!({}), |inner, _| json!({ "k": inner }))
}

fn json_flag(value: serde_json::Value) -> model::Flag {
    let variant = |name: &str, value: serde_json::Value| Variant {
        name: name.into(),
        value: Value::Json(value),
        description: String::new(),
    };
    model::Flag {
        namespace: "ns".into(),
        key: "deep".into(),
        description: String::new(),
        flag_type: FlagType::Json,
        variants: vec![variant("on", value), variant("off", json!({}))],
        enabled: true,
        disabled_variant: "off".into(),
        default_variant: "on".into(),
        rules: vec![],
        prerequisites: vec![],
        tags: vec![],
        metadata: model::Metadata::new(),
        stamp: Stamp::default(),
    }
}

/// Encodes and decodes `message`; the error names `what`.
fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(what: &str, message: M) {
    let bytes = message.encode_to_vec();
    match M::decode(bytes.as_slice()) {
        Ok(decoded) => assert_eq!(decoded, message, "{what}"),
        Err(e) => panic!("{what} does not decode: {e}"),
    }
}

/// Every message a flag (or its value) travels in.
fn through_every_message(flag: &model::Flag) {
    let pb_flag = pb::Flag::from(flag.clone());
    let value = pb_flag.variants[0].value.clone();
    let object = pb::Object {
        kind: Some(pb::object::Kind::Flag(pb_flag.clone())),
    };
    let bundle = pb::NamespaceBundle {
        flags: vec![pb_flag.clone()],
        ..Default::default()
    };
    round_trip(
        "CreateFlagRequest",
        pb::CreateFlagRequest {
            flag: Some(pb_flag.clone()),
            ..Default::default()
        },
    );
    round_trip(
        "UpdateFlagRequest",
        pb::UpdateFlagRequest {
            flag: Some(pb_flag.clone()),
            ..Default::default()
        },
    );
    round_trip(
        "ImportNamespaceRequest",
        pb::ImportNamespaceRequest {
            namespace: "ns".into(),
            source: Some(pb::import_namespace_request::Source::Bundle(bundle.clone())),
            ..Default::default()
        },
    );
    round_trip(
        "ExportNamespaceResponse",
        pb::ExportNamespaceResponse {
            revision: 1,
            bundle: Some(bundle),
        },
    );
    round_trip(
        "FlagResponse",
        pb::FlagResponse {
            revision: 1,
            flag: Some(pb_flag.clone()),
        },
    );
    round_trip(
        "ListFlagsResponse",
        pb::ListFlagsResponse {
            flags: vec![pb_flag.clone()],
            ..Default::default()
        },
    );
    // The change log keeps each write as a record of history entries with
    // before and after images; ListHistory answers with the same entries.
    round_trip(
        "ListHistoryResponse",
        pb::ListHistoryResponse {
            entries: vec![pb::HistoryEntry {
                before: Some(object.clone()),
                after: Some(object),
                ..Default::default()
            }],
            ..Default::default()
        },
    );
    round_trip(
        "SyncMessage.change",
        pb::SyncMessage {
            kind: Some(pb::sync_message::Kind::Change(pb::Change {
                revision: 2,
                deltas: vec![pb::Delta {
                    kind: Some(pb::delta::Kind::PutFlag(pb_flag.clone())),
                }],
                ..Default::default()
            })),
        },
    );
    round_trip(
        "SyncMessage.snapshot_chunk",
        pb::SyncMessage {
            kind: Some(pb::sync_message::Kind::SnapshotChunk(pb::SnapshotChunk {
                flags: vec![pb_flag],
                ..Default::default()
            })),
        },
    );
    let result = pb::EvaluateResponse {
        value,
        ..Default::default()
    };
    round_trip("EvaluateResponse", result.clone());
    round_trip(
        "WatchEvent",
        pb::WatchEvent {
            results: vec![result],
            ..Default::default()
        },
    );
}

#[test]
fn the_deepest_json_the_limits_allow_decodes_wherever_it_travels() {
    for (shape, value) in [
        ("objects", objects(MAX_JSON_DEPTH)),
        ("arrays", arrays(MAX_JSON_DEPTH)),
        ("mixed", mixed(MAX_JSON_DEPTH)),
        ("empty innermost object", empty_innermost(MAX_JSON_DEPTH)),
    ] {
        let flag = json_flag(value);
        assert_eq!(
            flagstream::validate::bundle(std::slice::from_ref(&flag), &[]),
            Ok(()),
            "{shape} at the limit must be accepted"
        );
        through_every_message(&flag);
    }
}

#[test]
fn one_level_deeper_is_refused_by_validation_yet_decodes_as_a_request() {
    for value in [
        objects(MAX_JSON_DEPTH + 1),
        arrays(MAX_JSON_DEPTH + 1),
        empty_innermost(MAX_JSON_DEPTH + 1),
    ] {
        let flag = json_flag(value);
        let error = flagstream::validate::bundle(std::slice::from_ref(&flag), &[]).unwrap_err();
        assert!(
            error.to_string().contains("variants[0].value.json_value"),
            "{error}"
        );
        let request = pb::CreateFlagRequest {
            flag: Some(pb::Flag::from(flag)),
            ..Default::default()
        };
        let bytes = request.encode_to_vec();
        pb::CreateFlagRequest::decode(bytes.as_slice())
            .expect("a request one level too deep still decodes, to be refused by name");
    }
}

/// A random JSON value at most `depth` levels deep (sometimes deeper than the
/// limit allows), of random shape and width, with at most about `budget`
/// nodes.
fn random_json(rng: &mut fastrand::Rng, depth: usize, budget: &mut usize) -> serde_json::Value {
    *budget = budget.saturating_sub(1);
    if depth == 0 || *budget == 0 || rng.u8(..8) == 0 {
        return match rng.u8(..5) {
            0 => json!(null),
            1 => json!(rng.bool()),
            2 => json!(rng.f64() * 1e6),
            3 => json!("s".repeat(rng.usize(..64))),
            _ => json!({}),
        };
    }
    let width = rng.usize(1..4);
    if rng.bool() {
        let map = (0..width)
            .map(|i| (format!("k{i}"), random_json(rng, depth - 1, budget)))
            .collect::<serde_json::Map<_, _>>();
        serde_json::Value::Object(map)
    } else {
        serde_json::Value::Array(
            (0..width)
                .map(|_| random_json(rng, depth - 1, budget))
                .collect(),
        )
    }
}

#[test]
fn every_accepted_value_decodes_wherever_it_travels() {
    let mut rng = fastrand::Rng::with_seed(12);
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..400 {
        let depth = rng.usize(MAX_JSON_DEPTH - 4..MAX_JSON_DEPTH + 4);
        let flag = json_flag(random_json(&mut rng, depth, &mut 200));
        if flagstream::validate::bundle(std::slice::from_ref(&flag), &[]).is_ok() {
            accepted += 1;
            through_every_message(&flag);
        } else {
            refused += 1;
        }
    }
    // Both sides of the limit were tried.
    assert!(
        accepted > 50 && refused > 10,
        "{accepted} accepted, {refused} refused"
    );
}
