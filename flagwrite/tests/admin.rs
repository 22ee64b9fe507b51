//! FlagAdmin against a real server on 127.0.0.1:0: every RPC's success path,
//! representative validation errors, conflicts, dry runs and the auth matrix.

mod common;

use common::*;
use flagstream::pb;
use tonic::Code;

#[tokio::test]
async fn every_rpc_succeeds() {
    let server = Server::start().await;
    let mut admin = server.admin(Some(ADMIN)).await;

    assert_eq!(create_namespace(&mut admin, "prod").await, 1);
    let list = admin
        .list_namespaces(pb::ListNamespacesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        list.namespaces
            .iter()
            .map(|n| n.key.as_str())
            .collect::<Vec<_>>(),
        ["prod"]
    );
    assert_eq!(list.revision, 1);

    let seg = admin
        .create_segment(pb::CreateSegmentRequest {
            segment: Some(segment("prod", "pro")),
            options: options("add pro"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seg.revision, 2);
    assert_eq!(seg.segment.unwrap().stamp.unwrap().updated_by, "ops");

    let mut checkout = flag("prod", "checkout");
    checkout.rules.push(segment_rule("pro"));
    assert_eq!(create_flag(&mut admin, checkout.clone()).await, 3);
    assert_eq!(create_flag(&mut admin, flag("prod", "banner")).await, 4);
    let mut other = flag("prod", "zeta");
    other.tags = vec!["other".into()];
    assert_eq!(create_flag(&mut admin, other).await, 5);

    let got = admin
        .get_flag(pb::GetFlagRequest {
            namespace: "prod".into(),
            key: "checkout".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.rules.len(), 1);
    let stamp = got.stamp.clone().unwrap();
    assert_eq!(
        (
            stamp.created_revision,
            stamp.updated_revision,
            stamp.updated_by.as_str()
        ),
        (3, 3, "ops")
    );

    // Paging, prefix and tag filters.
    let page = |size, token: &str, tag: &str, prefix: &str| pb::ListFlagsRequest {
        namespace: "prod".into(),
        page_size: size,
        page_token: token.into(),
        tag: tag.into(),
        key_prefix: prefix.into(),
    };
    let first = admin
        .list_flags(page(2, "", "", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys(&first.flags), ["banner", "checkout"]);
    let second = admin
        .list_flags(page(2, &first.next_page_token, "", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (keys(&second.flags), second.next_page_token.as_str()),
        (vec!["zeta"], "")
    );
    let tagged = admin
        .list_flags(page(0, "", "other", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys(&tagged.flags), ["zeta"]);
    let prefixed = admin
        .list_flags(page(0, "", "", "ch"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys(&prefixed.flags), ["checkout"]);

    // Update with the right expected revision, then the kill switch.
    let mut changed = got.clone();
    changed.description = "changed".into();
    let updated = admin
        .update_flag(pb::UpdateFlagRequest {
            flag: Some(changed),
            expected_revision: 3,
            options: options("describe"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.revision, 6);
    assert_eq!(
        updated
            .flag
            .as_ref()
            .unwrap()
            .stamp
            .as_ref()
            .unwrap()
            .created_revision,
        3
    );
    let off = admin
        .set_flag_enabled(pb::SetFlagEnabledRequest {
            namespace: "prod".into(),
            key: "checkout".into(),
            enabled: false,
            expected_revision: 6,
            options: options("incident 42"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((off.revision, off.flag.unwrap().enabled), (7, false));

    // Segments.
    let got_seg = admin
        .get_segment(pb::GetSegmentRequest {
            namespace: "prod".into(),
            key: "pro".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seg2 = got_seg.clone();
    seg2.description = "paying users".into();
    let up = admin
        .update_segment(pb::UpdateSegmentRequest {
            segment: Some(seg2),
            expected_revision: 2,
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(up.revision, 8);
    let segs = admin
        .list_segments(pb::ListSegmentsRequest {
            namespace: "prod".into(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(segs.segments.len(), 1);
    assert_eq!(segs.segments[0].description, "paying users");

    // History of one flag, newest first, paged.
    let history = |page_size, page_token: String| pb::ListHistoryRequest {
        namespace: "prod".into(),
        kind: pb::ObjectKind::Flag as i32,
        key: "checkout".into(),
        page_size,
        page_token,
    };
    let h1 = admin
        .list_history(history(2, String::new()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h1.entries.iter().map(|e| e.revision).collect::<Vec<_>>(),
        [7, 6]
    );
    assert_eq!(
        (
            h1.entries[0].operation.as_str(),
            h1.entries[0].comment.as_str(),
            h1.entries[0].actor.as_str()
        ),
        ("SetFlagEnabled", "incident 42", "ops")
    );
    assert!(h1.entries[0].before.is_some() && h1.entries[0].after.is_some());
    let h2 = admin
        .list_history(history(2, h1.next_page_token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h2.entries.iter().map(|e| e.revision).collect::<Vec<_>>(),
        [3]
    );
    assert!(h2.entries[0].before.is_none());
    assert!(h2.next_page_token.is_empty());
    let all = admin
        .list_history(pb::ListHistoryRequest {
            namespace: "prod".into(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        all.entries.iter().map(|e| e.revision).collect::<Vec<_>>(),
        [8, 7, 6, 5, 4, 3, 2, 1]
    );

    // Export, then import the bundle into a new namespace in one revision.
    let export = admin
        .export_namespace(pb::ExportNamespaceRequest {
            namespace: "prod".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(export.revision, 8);
    let bundle = export.bundle.unwrap();
    assert_eq!((bundle.flags.len(), bundle.segments.len()), (3, 1));
    let imported = admin
        .import_namespace(pb::ImportNamespaceRequest {
            namespace: "staging".into(),
            source: Some(pb::import_namespace_request::Source::Bundle(bundle)),
            options: options("copy prod"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(imported.revision, 9);
    let staged = admin
        .list_flags(pb::ListFlagsRequest {
            namespace: "staging".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys(&staged.flags), ["banner", "checkout", "zeta"]);
    assert!(
        staged
            .flags
            .iter()
            .all(|f| f.namespace == "staging" && f.stamp.as_ref().unwrap().updated_revision == 9)
    );
    // Re-importing a smaller bundle removes what it lacks.
    let smaller = pb::NamespaceBundle {
        namespace: None,
        flags: vec![flag("x", "only")],
        segments: vec![],
    };
    let again = admin
        .import_namespace(pb::ImportNamespaceRequest {
            namespace: "staging".into(),
            source: Some(pb::import_namespace_request::Source::Bundle(smaller)),
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.revision, 10);
    let staged = admin
        .list_flags(pb::ListFlagsRequest {
            namespace: "staging".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys(&staged.flags), ["only"]);

    // Deletions: the flag, the segment once unused, then the namespace.
    let del = |key: &str| pb::DeleteFlagRequest {
        namespace: "staging".into(),
        key: key.into(),
        expected_revision: 0,
        options: None,
    };
    assert_eq!(
        admin
            .delete_flag(del("only"))
            .await
            .unwrap()
            .into_inner()
            .revision,
        11
    );
    assert_eq!(
        admin
            .delete_namespace(pb::DeleteNamespaceRequest {
                namespace: "staging".into(),
                options: None
            })
            .await
            .unwrap()
            .into_inner()
            .revision,
        12
    );
    let mut checkout = admin
        .get_flag(pb::GetFlagRequest {
            namespace: "prod".into(),
            key: "checkout".into(),
        })
        .await
        .unwrap()
        .into_inner();
    checkout.rules.clear();
    admin
        .update_flag(pb::UpdateFlagRequest {
            flag: Some(checkout),
            expected_revision: 0,
            options: None,
        })
        .await
        .unwrap();
    let removed = admin
        .delete_segment(pb::DeleteSegmentRequest {
            namespace: "prod".into(),
            key: "pro".into(),
            expected_revision: 0,
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed.revision, 14);
    server.stop().await;
}

fn keys(flags: &[pb::Flag]) -> Vec<&str> {
    flags.iter().map(|f| f.key.as_str()).collect()
}

/// One refused CreateFlag: the code and a fragment the message must contain.
async fn check_refused(admin: &mut Admin, flag: pb::Flag, code: Code, message: &str) {
    let before = head(admin).await;
    let status = admin
        .create_flag(pb::CreateFlagRequest {
            flag: Some(flag),
            options: None,
        })
        .await
        .unwrap_err();
    assert_refused(&status, code, message);
    assert_eq!(head(admin).await, before, "a refused write took a revision");
}

/// One refused UpdateFlag, as [`check_refused`].
async fn check_update_refused(admin: &mut Admin, flag: pb::Flag, code: Code, message: &str) {
    let before = head(admin).await;
    let status = admin
        .update_flag(pb::UpdateFlagRequest {
            flag: Some(flag),
            expected_revision: 0,
            options: None,
        })
        .await
        .unwrap_err();
    assert_refused(&status, code, message);
    assert_eq!(head(admin).await, before, "a refused write took a revision");
}

fn assert_refused(status: &tonic::Status, code: Code, message: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(message),
        "{:?} should contain {message:?}",
        status.message()
    );
}

/// The store's head revision.
async fn head(admin: &mut Admin) -> u64 {
    admin
        .list_namespaces(pb::ListNamespacesRequest {})
        .await
        .unwrap()
        .into_inner()
        .revision
}

/// `key_prefix` with paging: a page token before, inside or after the
/// prefix's keys, and keys that sort next to the prefix without having it.
#[tokio::test]
async fn an_export_holds_its_namespace_alone_among_neighbours() {
    let server = Server::start().await;
    let mut admin = server.admin(Some(ADMIN)).await;
    // Neighbours in key order on both sides, whose objects a scan that ran on would pick up.
    for namespace in ["ex", "ex-a", "exa", "e"] {
        create_namespace(&mut admin, namespace).await;
        for key in ["a", "b"] {
            admin
                .create_flag(pb::CreateFlagRequest {
                    flag: Some(flag(namespace, &format!("{namespace}-{key}"))),
                    options: None,
                })
                .await
                .unwrap();
        }
    }
    let revision = head(&mut admin).await;
    for namespace in ["ex", "ex-a", "exa", "e"] {
        let export = admin
            .export_namespace(pb::ExportNamespaceRequest {
                namespace: namespace.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(export.revision, revision);
        let bundle = export.bundle.unwrap();
        assert_eq!(bundle.namespace.unwrap().key, namespace);
        assert_eq!(
            keys(&bundle.flags),
            [format!("{namespace}-a"), format!("{namespace}-b")]
        );
        assert!(bundle.segments.is_empty());
    }
    let missing = admin
        .export_namespace(pb::ExportNamespaceRequest {
            namespace: "ex-".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
}

#[tokio::test]
async fn listing_by_prefix_pages_within_the_prefix() {
    let server = Server::start().await;
    let mut admin = server.admin(Some(ADMIN)).await;
    create_namespace(&mut admin, "keys").await;
    // A neighbouring namespace whose keys would follow in a scan that ran on.
    create_namespace(&mut admin, "keys2").await;
    for (namespace, key) in [
        ("keys", "c"),
        ("keys", "cg"),
        ("keys", "ch"),
        ("keys", "ch-a"),
        ("keys", "ch-b"),
        ("keys", "chz"),
        ("keys", "ci"),
        ("keys", "d"),
        ("keys2", "ch-x"),
    ] {
        admin
            .create_flag(pb::CreateFlagRequest {
                flag: Some(flag(namespace, key)),
                options: None,
            })
            .await
            .unwrap();
    }
    let mut list = async |prefix: &str, token: &str, size: u32| {
        let page = admin
            .list_flags(pb::ListFlagsRequest {
                namespace: "keys".into(),
                page_size: size,
                page_token: token.into(),
                tag: String::new(),
                key_prefix: prefix.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let keys: Vec<String> = page.flags.iter().map(|f| f.key.clone()).collect();
        (keys, page.next_page_token)
    };
    let (first, token) = list("ch", "", 3).await;
    assert_eq!(
        (first, token.as_str()),
        (vec!["ch".into(), "ch-a".into(), "ch-b".into()], "ch-b")
    );
    let (second, token) = list("ch", &token, 3).await;
    assert_eq!((second, token.as_str()), (vec!["chz".to_string()], ""));
    // A token before the prefix starts at the prefix; one past it ends at once.
    assert_eq!(list("ch", "c", 0).await.0, ["ch", "ch-a", "ch-b", "chz"]);
    assert_eq!(list("ch", "ch-a", 0).await.0, ["ch-b", "chz"]);
    assert!(list("ch", "ci", 0).await.0.is_empty());
    assert_eq!(
        list("c", "", 0).await.0,
        ["c", "cg", "ch", "ch-a", "ch-b", "chz", "ci"]
    );
    assert!(list("e", "", 0).await.0.is_empty());
    assert_eq!(list("", "ci", 0).await.0, ["d"]);
}

#[tokio::test]
async fn invalid_writes_name_the_field_and_change_nothing() {
    let server = Server::start().await;
    let mut admin = server.admin(Some(ADMIN)).await;
    create_namespace(&mut admin, "prod").await;
    create_flag(&mut admin, flag("prod", "parent")).await;

    let with = |f: fn(&mut pb::Flag)| {
        let mut flag = flag("prod", "child");
        f(&mut flag);
        flag
    };
    let constraint = |op: pb::Operator, value: &str| pb::Rule {
        constraints: vec![pb::Constraint {
            attribute: "version".into(),
            operator: op as i32,
            values: vec![value.into()],
            ..Default::default()
        }],
        serve: Some(pb::Serve {
            kind: Some(pb::serve::Kind::Variant("on".into())),
        }),
        ..Default::default()
    };
    let cases: Vec<(pb::Flag, &str)> = vec![
        (with(|f| f.key = "has space".into()), "key"),
        (
            with(|f| f.default_variant = "missing".into()),
            "default_variant",
        ),
        (
            with(|f| f.rules.push(segment_rule("nope"))),
            "rules[0].segments[0]",
        ),
        (
            {
                let mut f = flag("prod", "child");
                f.rules.push(constraint(pb::Operator::SemverGt, "1.x"));
                f
            },
            "rules[0].constraints[0].values[0]",
        ),
        (
            {
                let mut f = flag("prod", "child");
                f.rules.push(constraint(pb::Operator::Regex, "(unclosed"));
                f
            },
            "rules[0].constraints[0].values[0]",
        ),
        (
            {
                let mut f = flag("prod", "child");
                f.rules.push(constraint(pb::Operator::Unspecified, "x"));
                f
            },
            "rules[0].constraints[0].operator",
        ),
        (
            {
                let mut f = flag("prod", "child");
                f.variants[0].value = Some(pb::TypedValue {
                    kind: Some(pb::typed_value::Kind::StringValue("yes".into())),
                });
                f
            },
            "variants[0].value",
        ),
        (
            {
                let mut f = flag("prod", "child");
                f.prerequisites.push(pb::Prerequisite {
                    flag: "ghost".into(),
                    ..Default::default()
                });
                f
            },
            "prerequisites[0].flag",
        ),
        (
            {
                let mut f = flag("prod", "child");
                f.rules = (0..201).map(|_| segment_rule("x")).collect();
                f
            },
            "rules",
        ),
    ];
    for (flag, path) in cases {
        check_refused(
            &mut admin,
            flag,
            Code::InvalidArgument,
            &format!("flag.{path}"),
        )
        .await;
    }
    // A cycle through a prerequisite: parent -> child -> parent.
    let mut child = flag("prod", "child");
    child.prerequisites.push(pb::Prerequisite {
        flag: "parent".into(),
        ..Default::default()
    });
    create_flag(&mut admin, child).await;
    let mut parent = flag("prod", "parent");
    parent.prerequisites.push(pb::Prerequisite {
        flag: "child".into(),
        ..Default::default()
    });
    let status = admin
        .update_flag(pb::UpdateFlagRequest {
            flag: Some(parent),
            expected_revision: 0,
            options: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with("flag.prerequisites[0]"),
        "{}",
        status.message()
    );
    server.stop().await;
}

/// A flag's dependents are checked when it changes, not only when they are written: an update
/// may neither drop a variant a dependent's prerequisite names, nor lengthen a dependent's
/// prerequisite chain past what the engine evaluates.
#[tokio::test]
async fn updates_keep_the_flags_that_depend_on_them_valid() {
    let server = Server::start().await;
    let mut admin = server.admin(Some(ADMIN)).await;
    create_namespace(&mut admin, "prod").await;
    let prerequisite = |parent: &str, variants: &[&str]| pb::Prerequisite {
        flag: parent.into(),
        variants: variants.iter().map(|v| v.to_string()).collect(),
        ..Default::default()
    };

    // link-7 -> link-6 -> ... -> link-0: a chain of 7, the longest the engine evaluates.
    create_flag(&mut admin, flag("prod", "link-0")).await;
    for i in 1..=flagstream::validate::MAX_PREREQUISITE_CHAIN {
        let mut link = flag("prod", &format!("link-{i}"));
        link.prerequisites
            .push(prerequisite(&format!("link-{}", i - 1), &[]));
        create_flag(&mut admin, link).await;
    }
    create_flag(&mut admin, flag("prod", "root")).await;
    // The bottom link taking a prerequisite would make link-7's chain 8 long.
    let mut bottom = flag("prod", "link-0");
    bottom.prerequisites.push(prerequisite("root", &[]));
    check_update_refused(
        &mut admin,
        bottom.clone(),
        Code::InvalidArgument,
        "flag.prerequisites: flag \"link-7\" depends on this flag, and with these prerequisites a chain of more than 7 prerequisites cannot be evaluated",
    )
    .await;
    // One link shorter is fine: the middle link may take the root instead of its parent...
    let mut middle = flag("prod", "link-4");
    middle.prerequisites.push(prerequisite("root", &[]));
    update_flag(&mut admin, middle).await;
    // ...after which link-0 no longer lies below link-7, so it may take the root too.
    update_flag(&mut admin, bottom).await;

    // child needs parent at variant "on"; parent renaming "on" to "yes" would leave it unmet forever.
    create_flag(&mut admin, flag("prod", "parent")).await;
    let mut child = flag("prod", "child");
    child.prerequisites.push(prerequisite("parent", &["on"]));
    create_flag(&mut admin, child).await;
    let mut renamed = flag("prod", "parent");
    renamed.variants[0].name = "yes".into();
    check_update_refused(
        &mut admin,
        renamed,
        Code::FailedPrecondition,
        "flag.variants: prerequisites name variants this update removes: \"on\" by \"child\"",
    )
    .await;
    let stored = admin
        .get_flag(pb::GetFlagRequest {
            namespace: "prod".into(),
            key: "parent".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stored.variants[0].name, "on",
        "the refused update changed nothing"
    );
    // Adding a variant, or dropping one nobody names, is fine.
    let mut grown = flag("prod", "parent");
    grown.variants.push(pb::Variant {
        name: "maybe".into(),
        value: bool_value(true),
        description: String::new(),
    });
    update_flag(&mut admin, grown).await;
    update_flag(&mut admin, flag("prod", "parent")).await;
    server.stop().await;
}

#[tokio::test]
async fn conflicts_and_preconditions() {
    let server = Server::start().await;
    let mut admin = server.admin(Some(ADMIN)).await;
    create_namespace(&mut admin, "prod").await;
    admin
        .create_segment(pb::CreateSegmentRequest {
            segment: Some(segment("prod", "pro")),
            options: None,
        })
        .await
        .unwrap();
    let mut user = flag("prod", "user");
    user.rules.push(segment_rule("pro"));
    let rev = create_flag(&mut admin, user.clone()).await;
    let mut child = flag("prod", "child");
    child.prerequisites.push(pb::Prerequisite {
        flag: "user".into(),
        ..Default::default()
    });
    create_flag(&mut admin, child).await;

    let cases: Vec<(tonic::Status, Code, String)> = vec![
        (
            admin
                .update_flag(pb::UpdateFlagRequest {
                    flag: Some(user.clone()),
                    expected_revision: rev + 100,
                    options: None,
                })
                .await
                .unwrap_err(),
            Code::Aborted,
            format!("is at revision {rev}"),
        ),
        (
            admin
                .set_flag_enabled(pb::SetFlagEnabledRequest {
                    namespace: "prod".into(),
                    key: "user".into(),
                    enabled: false,
                    expected_revision: 1,
                    options: None,
                })
                .await
                .unwrap_err(),
            Code::Aborted,
            format!("is at revision {rev}"),
        ),
        (
            admin
                .create_flag(pb::CreateFlagRequest {
                    flag: Some(user.clone()),
                    options: None,
                })
                .await
                .unwrap_err(),
            Code::AlreadyExists,
            "already exists".into(),
        ),
        (
            admin
                .create_namespace(pb::CreateNamespaceRequest {
                    namespace: Some(namespace("prod")),
                    options: None,
                })
                .await
                .unwrap_err(),
            Code::AlreadyExists,
            "already exists".into(),
        ),
        (
            admin
                .delete_segment(pb::DeleteSegmentRequest {
                    namespace: "prod".into(),
                    key: "pro".into(),
                    expected_revision: 0,
                    options: None,
                })
                .await
                .unwrap_err(),
            Code::FailedPrecondition,
            "used by flags [\"user\"]".into(),
        ),
        (
            admin
                .delete_flag(pb::DeleteFlagRequest {
                    namespace: "prod".into(),
                    key: "user".into(),
                    expected_revision: 0,
                    options: None,
                })
                .await
                .unwrap_err(),
            Code::FailedPrecondition,
            "prerequisite of flags [\"child\"]".into(),
        ),
        (
            admin
                .delete_namespace(pb::DeleteNamespaceRequest {
                    namespace: "prod".into(),
                    options: None,
                })
                .await
                .unwrap_err(),
            Code::FailedPrecondition,
            "flags [\"child\", \"user\"] and segments [\"pro\"]".into(),
        ),
        (
            admin
                .get_flag(pb::GetFlagRequest {
                    namespace: "prod".into(),
                    key: "nope".into(),
                })
                .await
                .unwrap_err(),
            Code::NotFound,
            "\"nope\"".into(),
        ),
        (
            admin
                .create_flag(pb::CreateFlagRequest {
                    flag: Some(flag("nowhere", "x")),
                    options: None,
                })
                .await
                .unwrap_err(),
            Code::NotFound,
            "namespace \"nowhere\"".into(),
        ),
        (
            {
                let mut f = user.clone();
                f.r#type = pb::FlagType::String as i32;
                f.variants = vec![pb::Variant {
                    name: "on".into(),
                    value: Some(pb::TypedValue {
                        kind: Some(pb::typed_value::Kind::StringValue("a".into())),
                    }),
                    description: String::new(),
                }];
                f.disabled_variant = "on".into();
                f.default_variant = "on".into();
                f.rules.clear();
                admin
                    .update_flag(pb::UpdateFlagRequest {
                        flag: Some(f),
                        expected_revision: 0,
                        options: None,
                    })
                    .await
                    .unwrap_err()
            },
            Code::InvalidArgument,
            "flag.type".into(),
        ),
    ];
    for (status, code, message) in cases {
        assert_refused(&status, code, &message);
    }
    server.stop().await;
}

#[tokio::test]
async fn validate_only_stores_nothing() {
    let server = Server::start().await;
    let mut admin = server.admin(Some(ADMIN)).await;
    create_namespace(&mut admin, "prod").await;
    let dry = Some(pb::WriteOptions {
        validate_only: true,
        comment: String::new(),
    });
    let response = admin
        .create_flag(pb::CreateFlagRequest {
            flag: Some(flag("prod", "dry")),
            options: dry.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.revision, 0);
    assert_eq!(response.flag.unwrap().key, "dry");
    let status = admin
        .get_flag(pb::GetFlagRequest {
            namespace: "prod".into(),
            key: "dry".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let mut bad = flag("prod", "dry");
    bad.default_variant = "nope".into();
    let status = admin
        .create_flag(pb::CreateFlagRequest {
            flag: Some(bad),
            options: dry,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    // The next real write takes revision 2: dry runs took none.
    assert_eq!(create_flag(&mut admin, flag("prod", "real")).await, 2);
    server.stop().await;
}

/// One cell of the auth matrix: a token (or none) calling one RPC.
async fn check(server: &Server, token: Option<&'static str>, rpc: &str, expected: Code) {
    let mut admin = server.admin(token).await;
    let mut sync = server.sync(token).await;
    let code = match rpc {
        "ListNamespaces" => admin
            .list_namespaces(pb::ListNamespacesRequest {})
            .await
            .map(|_| ()),
        "GetFlag" => admin
            .get_flag(pb::GetFlagRequest {
                namespace: "prod".into(),
                key: "f".into(),
            })
            .await
            .map(|_| ()),
        "ListHistory" => admin
            .list_history(pb::ListHistoryRequest {
                namespace: "prod".into(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "ExportNamespace" => admin
            .export_namespace(pb::ExportNamespaceRequest {
                namespace: "prod".into(),
            })
            .await
            .map(|_| ()),
        "SetFlagEnabled" => admin
            .set_flag_enabled(pb::SetFlagEnabledRequest {
                namespace: "prod".into(),
                key: "f".into(),
                enabled: true,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "CreateNamespace" => admin
            .create_namespace(pb::CreateNamespaceRequest {
                namespace: Some(namespace("x")),
                options: Some(pb::WriteOptions {
                    validate_only: true,
                    comment: String::new(),
                }),
            })
            .await
            .map(|_| ()),
        "Subscribe" => match sync
            .subscribe(pb::SubscribeRequest {
                from_revision: 1,
                namespaces: vec![],
                chain: vec![],
            })
            .await
        {
            Ok(mut stream) => stream.get_mut().message().await.map(|_| ()),
            Err(e) => Err(e),
        },
        other => panic!("no case for {other}"),
    }
    .err()
    .map_or(Code::Ok, |s| s.code());
    assert_eq!(code, expected, "token {token:?} calling {rpc}");
}

#[tokio::test]
async fn auth_matrix() {
    let server = Server::start().await;
    let mut admin = server.admin(Some(ADMIN)).await;
    create_namespace(&mut admin, "prod").await;
    create_flag(&mut admin, flag("prod", "f")).await;
    use Code::{Ok as Allowed, PermissionDenied as Denied, Unauthenticated as Unknown};
    let reads = [
        "ListNamespaces",
        "GetFlag",
        "ListHistory",
        "ExportNamespace",
    ];
    let writes = ["SetFlagEnabled", "CreateNamespace"];
    for rpc in reads {
        for (token, code) in [
            (Some(ADMIN), Allowed),
            (Some(READER), Allowed),
            (Some(SYNC), Denied),
            (Some(EVAL), Denied),
            (None, Unknown),
            (Some("wrong-secret-0123456789"), Unknown),
        ] {
            check(&server, token, rpc, code).await;
        }
    }
    for rpc in writes {
        for (token, code) in [
            (Some(ADMIN), Allowed),
            (Some(READER), Denied),
            (Some(SYNC), Denied),
            (Some(EVAL), Denied),
            (None, Unknown),
        ] {
            check(&server, token, rpc, code).await;
        }
    }
    for (token, code) in [
        (Some(SYNC), Allowed),
        (Some(ADMIN), Denied),
        (Some(READER), Denied),
        (Some(EVAL), Denied),
        (None, Unknown),
    ] {
        check(&server, token, "Subscribe", code).await;
    }
    server.stop().await;
}

/// History of one namespace while another is written in between, with a
/// many-object import whose entries are paged through one at a time, and the
/// kind and key filters.
#[tokio::test]
async fn history_pages_one_namespace_among_others() {
    let server = Server::start().await;
    let mut admin = server.admin(Some(ADMIN)).await;
    assert_eq!(create_namespace(&mut admin, "ours").await, 1);
    assert_eq!(create_namespace(&mut admin, "theirs").await, 2);
    assert_eq!(create_flag(&mut admin, flag("ours", "a")).await, 3);
    assert_eq!(create_flag(&mut admin, flag("theirs", "a")).await, 4);
    // One revision (5) that replaces "a" and adds "b" and "c".
    let imported = admin
        .import_namespace(pb::ImportNamespaceRequest {
            namespace: "ours".into(),
            source: Some(pb::import_namespace_request::Source::Bundle(
                pb::NamespaceBundle {
                    namespace: None,
                    flags: vec![flag("ours", "b"), flag("ours", "c")],
                    segments: Vec::new(),
                },
            )),
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(imported.revision, 5);
    assert_eq!(create_flag(&mut admin, flag("theirs", "b")).await, 6);

    let mut history = async |kind: pb::ObjectKind, key: &str, page_size: u32, token: &str| {
        let page = admin
            .list_history(pb::ListHistoryRequest {
                namespace: "ours".into(),
                kind: kind as i32,
                key: key.into(),
                page_size,
                page_token: token.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let entries: Vec<(u64, String)> = page
            .entries
            .iter()
            .map(|e| (e.revision, e.key.clone()))
            .collect();
        (entries, page.next_page_token)
    };
    let entry = |revision: u64, key: &str| (revision, key.to_string());
    // Every entry of "ours", newest first, two at a time: the import's three
    // entries span two pages.
    let (first, token) = history(pb::ObjectKind::Unspecified, "", 2, "").await;
    assert_eq!(first, [entry(5, "b"), entry(5, "c")]);
    let (second, token) = history(pb::ObjectKind::Unspecified, "", 2, &token).await;
    assert_eq!(second, [entry(5, "a"), entry(3, "a")]);
    let (third, token) = history(pb::ObjectKind::Unspecified, "", 2, &token).await;
    assert_eq!((third, token.as_str()), (vec![entry(1, "ours")], ""));
    // One flag: its creation and its deletion by the import, not "theirs"' "a".
    let (a, _) = history(pb::ObjectKind::Flag, "a", 10, "").await;
    assert_eq!(a, [entry(5, "a"), entry(3, "a")]);
    let (namespaces, _) = history(pb::ObjectKind::Namespace, "", 10, "").await;
    assert_eq!(namespaces, [entry(1, "ours")]);
    let (missing, token) = history(pb::ObjectKind::Flag, "zzz", 10, "").await;
    assert!(missing.is_empty() && token.is_empty());
}

/// An import's errors name the bad element: by position in a bundle, by
/// feature name in an Unleash export. Nothing is stored.
#[tokio::test]
async fn imports_name_the_bad_element_by_index_or_by_key() {
    let server = Server::start().await;
    let mut admin = server.admin(Some(ADMIN)).await;
    let mut refused = async |source: pb::import_namespace_request::Source| {
        let status = admin
            .import_namespace(pb::ImportNamespaceRequest {
                namespace: "imported".into(),
                source: Some(source),
                options: None,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        status.message().to_string()
    };
    let bundle = |flags: Vec<pb::Flag>| {
        pb::import_namespace_request::Source::Bundle(pb::NamespaceBundle {
            namespace: None,
            flags,
            segments: Vec::new(),
        })
    };
    let twice = refused(bundle(vec![
        flag("imported", "one"),
        flag("imported", "two"),
        flag("imported", "one"),
    ]))
    .await;
    assert!(
        twice.starts_with(r#"bundle.flags[2].key: duplicate flag key "one""#),
        "{twice}"
    );
    let mut orphan = flag("imported", "orphan");
    orphan.prerequisites.push(pb::Prerequisite {
        flag: "missing".into(),
        ..Default::default()
    });
    let message = refused(bundle(vec![flag("imported", "fine"), orphan])).await;
    assert!(
        message.starts_with("bundle.flags[1].prerequisites[0]") && message.contains("missing"),
        "{message}"
    );
    let unleash = r#"{"version": 2, "features": [
        {"name": "fine", "enabled": true, "strategies": [{"name": "default"}]},
        {"name": "child", "enabled": true, "strategies": [{"name": "default"}],
         "dependencies": [{"feature": "missing"}]}
    ]}"#;
    let message = refused(pb::import_namespace_request::Source::UnleashJson(
        unleash.into(),
    ))
    .await;
    assert!(
        message.starts_with(r#"unleash_json.flags["child"].prerequisites[0]"#)
            && message.contains("missing"),
        "{message}"
    );
    let namespaces = admin
        .list_namespaces(pb::ListNamespacesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(namespaces.namespaces.is_empty(), "{namespaces:?}");
}

#[tokio::test]
async fn unleash_import_is_atomic_and_names_the_bad_field() {
    let server = Server::start().await;
    let mut admin = server.admin(Some(ADMIN)).await;
    let import = |json: &str| pb::ImportNamespaceRequest {
        namespace: "legacy".into(),
        source: Some(pb::import_namespace_request::Source::UnleashJson(
            json.into(),
        )),
        options: options("migrate from Unleash"),
    };
    let good = r#"{"version": 2, "features": [
        {"name": "simple", "enabled": true, "strategies": [{"name": "default"}]},
        {"name": "rollout", "enabled": true, "strategies": [{"name": "flexibleRollout",
            "parameters": {"rollout": "50", "stickiness": "default", "groupId": "rollout"},
            "constraints": [{"contextName": "appName", "operator": "IN", "values": ["web"]}]}]}
    ]}"#;
    let revision = admin
        .import_namespace(import(good))
        .await
        .unwrap()
        .into_inner()
        .revision;
    assert_eq!(revision, 1);
    let flags = admin
        .list_flags(pb::ListFlagsRequest {
            namespace: "legacy".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys(&flags.flags), ["rollout", "simple"]);

    // Unleash would silently never match an unknown operator; we refuse it,
    // naming the feature and the field, and store nothing.
    let bad = r#"{"version": 2, "features": [
        {"name": "fine", "enabled": true, "strategies": [{"name": "default"}]},
        {"name": "broken", "enabled": true, "strategies": [{"name": "default",
            "constraints": [{"contextName": "appName", "operator": "SOUNDS_LIKE", "values": ["web"]}]}]}
    ]}"#;
    let status = admin.import_namespace(import(bad)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .starts_with("unleash_json.flags[\"broken\"]"),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("SOUNDS_LIKE"),
        "{}",
        status.message()
    );
    let status = admin
        .import_namespace(import("{not json"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let flags = admin
        .list_flags(pb::ListFlagsRequest {
            namespace: "legacy".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys(&flags.flags), ["rollout", "simple"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_writes() {
    let server = Server::start().await;
    let mut admin = server.admin(Some(ADMIN)).await;
    create_namespace(&mut admin, "prod").await;
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut writers = Vec::new();
    for w in 0..8 {
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
                    Ok(r) => acked.lock().unwrap().push((key, r.into_inner().revision)),
                    // Once shutdown starts, new calls are refused; that is fine.
                    Err(_) => return,
                }
            }
        }));
    }
    while acked.lock().unwrap().len() < 200 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let dir = server.stop_keeping_data().await;
    for writer in writers {
        writer.await.unwrap();
    }
    let server = Server::start_in(dir, |_| {}).await;
    let mut admin = server.admin(Some(ADMIN)).await;
    let acked = acked.lock().unwrap().clone();
    for (key, revision) in &acked {
        let flag = admin
            .get_flag(pb::GetFlagRequest {
                namespace: "prod".into(),
                key: key.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(flag.stamp.unwrap().created_revision, *revision);
    }
    server.stop().await;
}
