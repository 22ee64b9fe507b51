"""The flagd providers, unchanged, against flagread's flagd evaluation protocol (gRPC v2):
Python's openfeature-provider-flagd (RPC resolver) and Node's @openfeature/flagd-provider,
each through the OpenFeature SDK of its language. Every test runs once per language."""

import pytest

from conftest import DEFAULTS, DEMO_FLAGS, EVAL, EVAL_ELSEWHERE, THEME_DARK, flagd_config, kind

# (flag, OpenFeature type, context, value, variant, reason): every type and every reason of
# the demo namespace, each STATIC flag once (the providers cache STATIC results by key).
CASES = [
    ("new-checkout", "boolean", {"targetingKey": "alice"}, True, "on", "TARGETING_MATCH"),
    ("new-checkout", "boolean", {"targetingKey": "carol"}, False, "off", "DEFAULT"),
    ("banner", "string", {"targetingKey": "carol", "country": "DE"}, "Winter sale: 20% off", "sale", "TARGETING_MATCH"),
    ("banner", "string", {}, "Welcome!", "welcome", "DEFAULT"),
    ("theme", "object", {}, THEME_DARK, "dark", "STATIC"),
    ("max-items", "integer", {}, 25, "standard", "STATIC"),
    ("discount", "float", {"plan": "pro"}, 0.15, "pro", "TARGETING_MATCH"),
    ("discount", "float", {"plan": "free"}, 0.0, "none", "DEFAULT"),
    ("discount", "float", {"seats": 50}, 0.15, "pro", "TARGETING_MATCH"),
    ("discount", "float", {"seats": 49.5}, 0.0, "none", "DEFAULT"),
    ("legacy-search", "boolean", {}, False, "off", "DISABLED"),
    ("express-pay", "boolean", {"targetingKey": "alice"}, True, "on", "DEFAULT"),
    ("express-pay", "boolean", {"targetingKey": "carol"}, False, "off", "DISABLED"),
]


@pytest.fixture(params=["python", "node"])
def language(request):
    return request.param


def connect(provider, language: str, replica, **config):
    """A provider that is READY and has seen flagread name every flag of the namespace once
    after provider_ready (so that it drops what it may have cached): later events are changes."""
    driver = provider(language, flagd_config(replica, **config))
    assert driver.hello["ready"], driver.hello
    assert driver.changed() == set(DEMO_FLAGS)
    return driver


def test_the_provider_is_ready_within_its_default_deadline(provider, demo_replica, language):
    # Both providers default to a 500 ms deadline; Python's set-up fails when provider_ready
    # has not arrived by then, Node's waits for the channel within it.
    driver = connect(provider, language, demo_replica)
    assert driver.hello["ms"] < 500, driver.hello


def test_every_type_reason_and_variant_reaches_the_application(provider, demo_replica, language):
    driver = connect(provider, language, demo_replica)
    for key, type_, context, value, variant, reason in CASES:
        got = driver.eval(type_, key, context=context)
        want = {"value": value, "variant": variant, "reason": reason, "errorCode": None}
        assert {k: got[k] for k in want} == want, (key, context, got)
        assert kind(got["value"], language) == kind(value, language), (key, got)


def test_a_split_serves_the_variant_flageval_chooses_for_the_context(provider, demo_replica, language):
    driver = provider(language, flagd_config(demo_replica))
    for user in ["alice", "bob", "carol", "dave", "erin", "frank"]:
        context = {"targetingKey": user}
        expected = demo_replica.evaluate("page-size", context)
        for type_ in (["integer", "float"] if language == "python" else ["float"]):
            got = driver.eval(type_, "page-size", context=context)
            assert (got["value"], got["variant"], got["reason"]) == (
                expected.value.number_value, expected.variant, "SPLIT"), (user, type_, got)


def test_flag_metadata_carries_the_flags_metadata_and_the_namespace(provider, demo_replica, language):
    driver = provider(language, flagd_config(demo_replica))
    got = driver.eval("boolean", "new-checkout", context={"targetingKey": "alice"})
    if language == "python":
        # openfeature-provider-flagd's RPC resolver drops the response's metadata (see PROVIDERS.md).
        assert got["metadata"] == {}, got
        return
    assert got["metadata"]["owner"] == "checkout-team", got
    assert got["metadata"]["flagSetId"] == "demo", got
    assert got["metadata"]["revision"] >= 10, got


def test_an_unknown_flag_is_flag_not_found(provider, demo_replica, language):
    driver = provider(language, flagd_config(demo_replica))
    got = driver.eval("boolean", "no-such-flag")
    assert (got["value"], got["reason"], got["errorCode"]) == (DEFAULTS["boolean"], "ERROR", "FLAG_NOT_FOUND"), got


def test_an_unknown_namespace_in_the_selector_is_flag_not_found(provider, demo_replica, locked_replica, language):
    # Without a token an unknown namespace is refused like any namespace that is not
    # anonymous (UNAUTHENTICATED, so GENERAL); the demo replica lists one that does not exist.
    driver = provider(language, flagd_config(demo_replica, selector="flagSetId=not-yet-created"))
    got = driver.eval("boolean", "new-checkout")
    assert (got["value"], got["reason"], got["errorCode"]) == (False, "ERROR", "FLAG_NOT_FOUND"), got
    if language == "python":
        driver = provider(language, flagd_config(locked_replica, selector="flagSetId=no-such-namespace", token=EVAL))
        got = driver.eval("boolean", "new-checkout")
        assert (got["value"], got["reason"], got["errorCode"]) == (False, "ERROR", "FLAG_NOT_FOUND"), got


def test_the_selector_names_the_namespace(provider, scratch, stack, language):
    # The scratch replica's default namespace is its copy of the demo, where the banner now
    # says "sale"; a selector turns to the demo namespace, where it still says "welcome".
    stack.update_flag(scratch.namespace, "banner", lambda f: f.update(default_variant="sale"))
    scratch.wait_revision(stack.revision, scratch.namespace)
    assert provider(language, flagd_config(scratch)).eval("string", "banner")["variant"] == "sale"
    for selector in ["flagSetId=demo", "demo"]:
        driver = provider(language, flagd_config(scratch, selector=selector))
        assert driver.eval("string", "banner")["variant"] == "welcome", selector


def test_python_sends_a_token_through_channel_credentials(provider, locked_replica):
    # openfeature-provider-flagd has no header option; gRPC call credentials on a local
    # (loopback) or TLS channel carry `authorization` on every call and on the EventStream.
    driver = provider("python", flagd_config(locked_replica, token=EVAL))
    assert driver.hello["ready"], driver.hello
    got = driver.eval("boolean", "new-checkout", context={"targetingKey": "alice"})
    assert (got["value"], got["reason"]) == (True, "TARGETING_MATCH"), got


def test_python_with_a_token_for_another_namespace_gets_an_error(provider, locked_replica):
    driver = provider("python", flagd_config(locked_replica, token=EVAL_ELSEWHERE))
    assert not driver.hello["ready"], driver.hello
    got = driver.eval("boolean", "new-checkout")
    # PERMISSION_DENIED: the provider maps it to GENERAL.
    assert (got["value"], got["reason"], got["errorCode"]) == (False, "ERROR", "GENERAL"), got


def test_without_a_token_a_namespace_that_is_not_anonymous_is_refused(provider, locked_replica, language):
    driver = provider(language, flagd_config(locked_replica))
    assert not driver.hello["ready"], driver.hello
    got = driver.eval("boolean", "new-checkout", context={"targetingKey": "alice"})
    # UNAUTHENTICATED: both providers map it to GENERAL.
    assert (got["value"], got["reason"], got["errorCode"]) == (False, "ERROR", "GENERAL"), got


@pytest.mark.parametrize("type_,key", [("string", "new-checkout"), ("boolean", "banner"), ("object", "banner"),
                                       ("boolean", "theme"), ("string", "page-size")])
def test_a_wrong_type_is_type_mismatch(provider, demo_replica, language, type_, key):
    driver = provider(language, flagd_config(demo_replica))
    got = driver.eval(type_, key)
    assert (got["value"], got["reason"], got["errorCode"]) == (DEFAULTS[type_], "ERROR", "TYPE_MISMATCH"), got


def test_an_integer_read_of_a_fractional_number_is_type_mismatch_in_python(provider, demo_replica):
    # ResolveInt serves whole numbers only. Node's provider reads every number with ResolveFloat.
    driver = provider("python", flagd_config(demo_replica))
    got = driver.eval("integer", "discount", context={"plan": "pro"})
    assert (got["value"], got["errorCode"]) == (DEFAULTS["integer"], "TYPE_MISMATCH"), got
    assert driver.eval("integer", "discount", context={"plan": "free"})["value"] == 0


def test_a_static_result_is_cached_until_the_flag_changes_through_flagwrite(provider, scratch, stack, language):
    driver = connect(provider, language, scratch)
    first = driver.eval("object", "theme")
    assert (first["value"], first["variant"], first["reason"]) == (THEME_DARK, "dark", "STATIC"), first
    cached = driver.eval("object", "theme")
    assert (cached["value"], cached["variant"], cached["reason"]) == (THEME_DARK, "dark", "CACHED"), cached

    stack.update_flag(scratch.namespace, "theme", lambda f: f.update(default_variant="light"))
    assert driver.changed() == {"theme"}
    fresh = driver.eval("object", "theme")
    assert (fresh["variant"], fresh["reason"], fresh["value"]["mode"]) == ("light", "STATIC", "light"), fresh


def test_a_result_that_depends_on_the_context_is_never_cached(provider, demo_replica, language):
    driver = provider(language, flagd_config(demo_replica))
    for _ in range(2):
        assert driver.eval("boolean", "new-checkout", context={"targetingKey": "alice"})["reason"] == "TARGETING_MATCH"
        assert driver.eval("boolean", "new-checkout", context={"targetingKey": "carol"})["reason"] == "DEFAULT"
        # A flag without rules but with a prerequisite depends on the context too: not STATIC.
        assert driver.eval("boolean", "express-pay", context={"targetingKey": "alice"})["reason"] == "DEFAULT"


def test_a_change_of_a_prerequisite_names_the_flags_that_depend_on_it(provider, scratch, stack, language):
    driver = connect(provider, language, scratch)
    carol = {"targetingKey": "carol"}
    assert driver.eval("boolean", "express-pay", context=carol)["reason"] == "DISABLED"

    # A prerequisite holds when the parent is served by a rule or is STATIC: without rules
    # and with "on" as its default, new-checkout is STATIC "on" for everyone.
    stack.update_flag(scratch.namespace, "new-checkout", lambda f: f.update(default_variant="on", rules=[]))
    assert driver.changed() == {"new-checkout", "express-pay"}
    got = driver.eval("boolean", "express-pay", context=carol)
    assert (got["value"], got["variant"], got["reason"]) == (True, "on", "DEFAULT"), got


def test_a_change_of_a_segment_names_the_flags_that_use_it_and_their_dependents(provider, scratch, stack, language):
    driver = connect(provider, language, scratch)
    carol = {"targetingKey": "carol"}
    assert driver.eval("boolean", "new-checkout", context=carol)["value"] is False

    stack.admin("UpdateSegment", {"segment": {
        "namespace": scratch.namespace, "key": "beta-testers",
        "constraints": [{"attribute": "userId", "operator": "OPERATOR_IN", "values": ["alice", "bob", "carol"]}]}})
    assert driver.changed() == {"new-checkout", "express-pay"}
    got = driver.eval("boolean", "new-checkout", context=carol)
    assert (got["value"], got["reason"]) == (True, "TARGETING_MATCH"), got


def test_a_disabled_flag_serves_its_disabled_variant_and_switching_it_on_is_announced(provider, scratch, stack, language):
    driver = connect(provider, language, scratch)
    assert driver.eval("boolean", "legacy-search")["reason"] == "DISABLED"
    stack.admin("SetFlagEnabled", {"namespace": scratch.namespace, "key": "legacy-search", "enabled": True})
    assert driver.changed() == {"legacy-search"}
    got = driver.eval("boolean", "legacy-search")
    assert (got["value"], got["variant"], got["reason"]) == (True, "on", "STATIC"), got


@pytest.mark.parametrize("signal", ["SIGKILL", "SIGTERM"])
def test_the_provider_recovers_after_the_replica_restarts_on_the_same_port(provider, scratch, stack, language, signal):
    driver = connect(provider, language, scratch)
    assert driver.eval("string", "banner")["variant"] == "welcome"

    driver.forget_events()
    if signal == "SIGKILL":
        scratch.kill()
    else:
        scratch.terminate()
    driver.wait_event(lambda e: e["event"] in ("PROVIDER_STALE", "PROVIDER_ERROR"), 20,
                      "STALE or ERROR once the replica is gone")
    # A write while the replica is down: the restarted replica must serve it.
    stack.update_flag(scratch.namespace, "banner", lambda f: f.update(default_variant="sale"))
    scratch.start(namespace=scratch.namespace)
    # Python waits up to its 5 s maximum backoff before it opens a new stream; Node retries
    # every 5 s; both announce READY again.
    driver.wait_event(lambda e: e["event"] == "PROVIDER_READY", 30, "READY after the restart")
    assert driver.changed() == set(DEMO_FLAGS)
    got = driver.eval("string", "banner")
    assert (got["value"], got["variant"], got["errorCode"]) == ("Winter sale: 20% off", "sale", None), got

    # Events resume on the new stream.
    stack.update_flag(scratch.namespace, "banner", lambda f: f.update(default_variant="welcome"))
    assert driver.changed() == {"banner"}
    assert driver.eval("string", "banner")["variant"] == "welcome"


def test_a_static_result_cached_before_an_outage_is_not_served_after_it(provider, scratch, stack, language):
    # A STATIC flag that changes while the provider has no stream: no change event names it.
    # Node's provider empties its cache when the stream breaks; Python's only once it has been
    # disconnected for its 10 s grace period (see PROVIDERS.md), so after a short outage only
    # the event naming every flag after provider_ready on the new stream evicts the old value.
    driver = connect(provider, language, scratch)
    assert driver.eval("object", "theme")["reason"] == "STATIC"
    assert driver.eval("object", "theme")["reason"] == "CACHED"

    driver.forget_events()
    scratch.kill()
    stack.update_flag(scratch.namespace, "theme", lambda f: f.update(default_variant="light"))
    scratch.start(namespace=scratch.namespace)
    driver.wait_event(lambda e: e["event"] == "PROVIDER_READY", 30, "READY after the restart")
    # flagread names every flag once on the new stream, which evicts the stale entry.
    assert driver.changed() == set(DEMO_FLAGS)
    got = driver.eval("object", "theme")
    assert (got["variant"], got["reason"]) == ("light", "STATIC"), got
