//! The flags the benchmarks load, as wire messages (they go through FlagAdmin
//! like any client's): the "3 constraints + 50% rollout + 3 weighted variants"
//! flag of the engine benchmarks, plain on/off flags, and a mixed namespace.

use std::collections::{BTreeMap, HashMap};

use flagstream::pb;
use pb::serve::Kind as ServeKind;
use pb::typed_value::Kind as ValueKind;

/// The namespace of the read-path and propagation benchmarks.
pub const NAMESPACE: &str = "bench";
/// The flag `Evaluate` is measured on.
pub const CONSTRAINED_FLAG: &str = "checkout-color";

fn string_value(text: &str) -> pb::TypedValue {
    pb::TypedValue {
        kind: Some(ValueKind::StringValue(text.to_string())),
    }
}

fn bool_value(value: bool) -> pb::TypedValue {
    pb::TypedValue {
        kind: Some(ValueKind::BoolValue(value)),
    }
}

fn variant(name: &str, value: pb::TypedValue) -> pb::Variant {
    pb::Variant {
        name: name.to_string(),
        value: Some(value),
        description: String::new(),
    }
}

fn constraint(
    attribute: &str,
    operator: pb::Operator,
    values: &[&str],
    case_insensitive: bool,
) -> pb::Constraint {
    pb::Constraint {
        attribute: attribute.to_string(),
        operator: operator as i32,
        values: values.iter().map(|v| v.to_string()).collect(),
        inverted: false,
        case_insensitive,
    }
}

fn metadata(owner: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("owner".to_string(), owner.to_string())])
}

/// A string flag with one rule: `environment` IN (production, staging), the
/// property `email` starts with "admin" (case-insensitive), the property `age`
/// ≥ 18, a 50% rollout on the default stickiness, serving a weighted split of
/// three variants. The benchmark context matches every constraint, so the
/// whole rule (constraints, rollout hash, split hash) runs on every call.
pub fn constrained_flag(namespace: &str, key: &str) -> pb::Flag {
    pb::Flag {
        namespace: namespace.to_string(),
        key: key.to_string(),
        description: "Button colour experiment".to_string(),
        r#type: pb::FlagType::String as i32,
        variants: vec![
            variant("red", string_value("#d03030")),
            variant("green", string_value("#30d030")),
            variant("blue", string_value("#3030d0")),
            variant("off", string_value("#808080")),
        ],
        enabled: true,
        disabled_variant: "off".to_string(),
        default_variant: "off".to_string(),
        rules: vec![pb::Rule {
            name: "adults-in-prod".to_string(),
            constraints: vec![
                constraint(
                    "environment",
                    pb::Operator::In,
                    &["production", "staging"],
                    false,
                ),
                constraint(
                    "email",
                    pb::Operator::StrStartsWith,
                    &["admin", "ops"],
                    true,
                ),
                constraint("age", pb::Operator::NumGte, &["18"], false),
            ],
            segments: Vec::new(),
            rollout: Some(pb::Rollout {
                percentage: 50,
                stickiness: "default".to_string(),
                group_id: String::new(),
            }),
            serve: Some(pb::Serve {
                kind: Some(ServeKind::Split(pb::Split {
                    variants: vec![
                        pb::WeightedVariant {
                            variant: "red".to_string(),
                            weight: 333,
                        },
                        pb::WeightedVariant {
                            variant: "green".to_string(),
                            weight: 333,
                        },
                        pb::WeightedVariant {
                            variant: "blue".to_string(),
                            weight: 334,
                        },
                    ],
                    stickiness: "default".to_string(),
                    group_id: String::new(),
                    overrides: Vec::new(),
                })),
            }),
        }],
        prerequisites: Vec::new(),
        tags: vec!["experiment".to_string()],
        metadata: metadata("growth"),
        stamp: None,
    }
}

/// A boolean kill switch with no rules.
pub fn on_off_flag(namespace: &str, key: &str, enabled: bool) -> pb::Flag {
    pb::Flag {
        namespace: namespace.to_string(),
        key: key.to_string(),
        description: String::new(),
        r#type: pb::FlagType::Boolean as i32,
        variants: vec![
            variant("on", bool_value(true)),
            variant("off", bool_value(false)),
        ],
        enabled,
        disabled_variant: "off".to_string(),
        default_variant: "on".to_string(),
        rules: Vec::new(),
        prerequisites: Vec::new(),
        tags: Vec::new(),
        metadata: metadata("platform"),
        stamp: None,
    }
}

/// A boolean flag on for a 25% rollout of users in two countries.
pub fn rollout_flag(namespace: &str, key: &str) -> pb::Flag {
    pb::Flag {
        rules: vec![pb::Rule {
            name: "eu-rollout".to_string(),
            constraints: vec![constraint(
                "country",
                pb::Operator::In,
                &["de", "fr"],
                false,
            )],
            segments: Vec::new(),
            rollout: Some(pb::Rollout {
                percentage: 25,
                stickiness: "default".to_string(),
                group_id: String::new(),
            }),
            serve: Some(pb::Serve {
                kind: Some(ServeKind::Variant("on".to_string())),
            }),
        }],
        default_variant: "off".to_string(),
        ..on_off_flag(namespace, key, true)
    }
}

/// `count` flags for `EvaluateAll`: the constrained flag, then a third each
/// of constrained, rollout and on/off flags, keys `flag-00000`….
pub fn mixed_namespace(namespace: &str, count: usize) -> Vec<pb::Flag> {
    let mut flags = vec![constrained_flag(namespace, CONSTRAINED_FLAG)];
    for index in 1..count {
        let key = format!("flag-{index:05}");
        flags.push(match index % 3 {
            0 => constrained_flag(namespace, &key),
            1 => rollout_flag(namespace, &key),
            _ => on_off_flag(namespace, &key, index % 2 == 0),
        });
    }
    flags
}

/// The context of every benchmark request: it satisfies the constrained
/// flag's constraints, so evaluation goes all the way to the split.
pub fn context() -> pb::Context {
    pb::Context {
        targeting_key: "user-4242".to_string(),
        user_id: "user-4242".to_string(),
        session_id: String::new(),
        remote_address: "10.1.2.3".to_string(),
        environment: "production".to_string(),
        app_name: "web".to_string(),
        current_time: None,
        properties: HashMap::from([
            ("email".to_string(), "Admin@example.com".to_string()),
            ("age".to_string(), "34".to_string()),
            ("country".to_string(), "de".to_string()),
        ]),
    }
}

/// Creates a namespace and fills it in one revision with ImportNamespace (the
/// fastest way to load many flags: one request, one transaction, one fsync).
pub async fn import(admin: &mut super::AdminClient, namespace: &str, flags: Vec<pb::Flag>) -> u64 {
    let bundle = pb::NamespaceBundle {
        namespace: Some(pb::Namespace {
            key: namespace.to_string(),
            description: String::new(),
            stamp: None,
        }),
        flags,
        segments: Vec::new(),
    };
    let response = admin
        .import_namespace(pb::ImportNamespaceRequest {
            namespace: namespace.to_string(),
            source: Some(pb::import_namespace_request::Source::Bundle(bundle)),
            options: None,
        })
        .await
        .unwrap_or_else(|status| panic!("ImportNamespace {namespace} failed: {status}"));
    response.into_inner().revision
}

/// The writes the propagation benchmarks time, in one pattern: even writes flip the kill switch
/// of an on/off flag ([`SWITCH_FLAG`]), odd ones move the constrained flag's rollout.
pub struct Writes {
    admin: super::AdminClient,
    constrained: pb::Flag,
    /// Writes made so far, so the switch keeps alternating across rounds and parts.
    pub count: usize,
}

/// The on/off flag whose kill switch [`Writes`] flips.
pub const SWITCH_FLAG: &str = "flag-00002";

impl Writes {
    /// Loads a namespace of `flags` mixed flags into the writer at `addr`; returns the writes
    /// and the revision of the load.
    pub async fn load(addr: &str, flags: usize) -> (Writes, u64) {
        let mut admin =
            super::admin_client(super::connect(addr, std::time::Duration::from_secs(5)).await);
        let flags = mixed_namespace(NAMESPACE, flags);
        assert_eq!(
            (flags[0].key.as_str(), flags[2].key.as_str()),
            (CONSTRAINED_FLAG, SWITCH_FLAG)
        );
        let constrained = flags[0].clone();
        let revision = import(&mut admin, NAMESPACE, flags).await;
        let writes = Writes {
            admin,
            constrained,
            count: 0,
        };
        (writes, revision)
    }

    /// Makes the next write and returns its revision once acknowledged.
    pub async fn next(&mut self) -> u64 {
        let index = self.count;
        self.count += 1;
        if index.is_multiple_of(2) {
            self.admin
                .set_flag_enabled(pb::SetFlagEnabledRequest {
                    namespace: NAMESPACE.to_string(),
                    key: SWITCH_FLAG.to_string(),
                    enabled: (index / 2) % 2 == 1,
                    expected_revision: 0,
                    options: None,
                })
                .await
                .unwrap_or_else(|status| panic!("SetFlagEnabled failed: {status}"))
                .into_inner()
                .revision
        } else {
            let rollout = self.constrained.rules[0]
                .rollout
                .as_mut()
                .expect("the constrained flag has a rollout");
            rollout.percentage = 40 + (index % 20) as u32;
            self.admin
                .update_flag(pb::UpdateFlagRequest {
                    flag: Some(self.constrained.clone()),
                    expected_revision: 0,
                    options: None,
                })
                .await
                .unwrap_or_else(|status| panic!("UpdateFlag failed: {status}"))
                .into_inner()
                .revision
        }
    }
}
