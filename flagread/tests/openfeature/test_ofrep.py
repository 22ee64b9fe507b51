"""OFREP on flagread's HTTP port: the OFREP providers, unchanged (Python's
openfeature-provider-ofrep and Node's @openfeature/ofrep-provider, each through its language's
OpenFeature SDK), and what they cannot show with a plain HTTP client (http.client): status
codes and bodies, the bulk endpoint's ETag and 304, and 429 with Retry-After."""

import http.client
import json
import threading
import time

import pytest

from conftest import (CALL_S, DEFAULTS, DEMO_FLAGS, EVAL, EVAL_DEMO, EVAL_ELSEWHERE, THEME_DARK, kind, ofrep_config,
                      wait_for)

# (flag, OpenFeature type, context, value, variant, reason), as for the flagd providers; NUMBER
# flags are read as floats (OFREP has no integers: whole numbers come as 25.0).
CASES = [
    ("new-checkout", "boolean", {"targetingKey": "alice"}, True, "on", "TARGETING_MATCH"),
    ("new-checkout", "boolean", {"targetingKey": "carol"}, False, "off", "DEFAULT"),
    ("banner", "string", {"targetingKey": "carol", "country": "DE"}, "Winter sale: 20% off", "sale", "TARGETING_MATCH"),
    ("banner", "string", {}, "Welcome!", "welcome", "DEFAULT"),
    ("theme", "object", {}, THEME_DARK, "dark", "STATIC"),
    ("max-items", "float", {}, 25.0, "standard", "STATIC"),
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


def post(port: int, path: str, body=None, headers: dict | None = None):
    """One POST; returns (status, headers with lower-case names, raw body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=CALL_S)
    try:
        data = b"" if body is None else json.dumps(body).encode()
        connection.request("POST", path, body=data, headers={"Content-Type": "application/json"} | (headers or {}))
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


# The providers.

def test_every_type_reason_and_variant_reaches_the_application(provider, demo_replica, language):
    driver = provider(language, ofrep_config(demo_replica))
    assert driver.hello["ready"], driver.hello
    for key, type_, context, value, variant, reason in CASES:
        got = driver.eval(type_, key, context=context)
        want = {"value": value, "variant": variant, "reason": reason, "errorCode": None}
        assert {k: got[k] for k in want} == want, (key, context, got)
        assert kind(got["value"], language) == kind(value, language), (key, got)


def test_a_split_serves_the_variant_flageval_chooses_for_the_context(provider, demo_replica, language):
    driver = provider(language, ofrep_config(demo_replica))
    for user in ["alice", "bob", "carol", "dave", "erin", "frank"]:
        expected = demo_replica.evaluate("page-size", {"targetingKey": user})
        got = driver.eval("float", "page-size", context={"targetingKey": user})
        assert (got["value"], got["variant"], got["reason"]) == (
            expected.value.number_value, expected.variant, "SPLIT"), (user, got)


def test_flag_metadata_carries_the_flags_metadata_the_namespace_and_the_revision(provider, demo_replica, language):
    got = provider(language, ofrep_config(demo_replica)).eval("object", "theme")
    assert got["metadata"]["owner"] == "design-team", got
    assert got["metadata"]["flagSetId"] == "demo", got
    assert got["metadata"]["revision"] >= 10, got


def test_an_integer_read_works_in_node_and_is_type_mismatch_in_python(provider, demo_replica, language):
    # Whole NUMBER values are written 25.0 so that float reads work in typed SDKs; Python's
    # provider then refuses an int read (its type check wants int), Node has one number type.
    got = provider(language, ofrep_config(demo_replica)).eval("integer", "max-items")
    if language == "python":
        assert (got["value"], got["errorCode"]) == (DEFAULTS["integer"], "TYPE_MISMATCH"), got
    else:
        assert (got["value"], got["variant"], got["errorCode"]) == (25, "standard", None), got


def test_an_unknown_flag_is_flag_not_found(provider, demo_replica, language):
    got = provider(language, ofrep_config(demo_replica)).eval("boolean", "no-such-flag")
    assert (got["value"], got["reason"], got["errorCode"]) == (False, "ERROR", "FLAG_NOT_FOUND"), got


@pytest.mark.parametrize("type_,key", [("string", "new-checkout"), ("boolean", "banner"), ("string", "theme")])
def test_a_wrong_type_is_type_mismatch(provider, demo_replica, language, type_, key):
    got = provider(language, ofrep_config(demo_replica)).eval(type_, key)
    assert (got["value"], got["reason"], got["errorCode"]) == (DEFAULTS[type_], "ERROR", "TYPE_MISMATCH"), got


def test_a_bad_selector_is_invalid_context(provider, demo_replica, language):
    driver = provider(language, ofrep_config(demo_replica, headers={"flagd-selector": "foo=bar"}))
    got = driver.eval("boolean", "new-checkout")
    assert (got["value"], got["reason"], got["errorCode"]) == (False, "ERROR", "INVALID_CONTEXT"), got


def test_the_selector_header_names_the_namespace(provider, scratch, stack, language):
    stack.update_flag(scratch.namespace, "banner", lambda f: f.update(default_variant="sale"))
    scratch.wait_revision(stack.revision, scratch.namespace)
    assert provider(language, ofrep_config(scratch)).eval("string", "banner")["variant"] == "sale"
    selected = provider(language, ofrep_config(scratch, headers={"flagd-selector": "flagSetId=demo"}))
    assert selected.eval("string", "banner")["variant"] == "welcome"


@pytest.mark.parametrize("token", [EVAL, EVAL_DEMO])
def test_a_token_in_the_headers_reads_a_namespace_that_is_not_anonymous(provider, locked_replica, language, token):
    driver = provider(language, ofrep_config(locked_replica, headers=bearer(token)))
    got = driver.eval("boolean", "new-checkout", context={"targetingKey": "alice"})
    assert (got["value"], got["reason"], got["errorCode"]) == (True, "TARGETING_MATCH", None), got


@pytest.mark.parametrize("headers", [{}, bearer("not-a-token-0123456789abcdef"), bearer(EVAL_ELSEWHERE)],
                         ids=["no-token", "unknown-token", "other-namespace"])
def test_a_refused_token_is_an_error_with_the_default_value(provider, locked_replica, language, headers):
    got = provider(language, ofrep_config(locked_replica, headers=headers)).eval("boolean", "new-checkout")
    # Both providers map 401 and 403 to GENERAL; Python's message says which.
    assert (got["value"], got["reason"], got["errorCode"]) == (False, "ERROR", "GENERAL"), got
    if language == "python":
        expected = "forbidden" if headers.get("Authorization", "").endswith(EVAL_ELSEWHERE) else "unauthorized"
        assert got["errorMessage"] == expected, got


# Plain HTTP.

def test_a_single_flag_answers_json_with_whole_numbers_written_as_floats(demo_replica):
    status, headers, body = post(demo_replica.ofrep_port, "/ofrep/v1/evaluate/flags/max-items", {"context": {}})
    assert status == 200, body
    assert headers["content-type"].startswith("application/json"), headers
    assert b'"value":25.0' in body.replace(b" ", b""), body
    answer = json.loads(body)
    assert {k: answer[k] for k in ("key", "reason", "variant", "value")} == {
        "key": "max-items", "reason": "STATIC", "variant": "standard", "value": 25.0}, answer


def test_an_empty_body_is_an_empty_context(demo_replica):
    status, _, body = post(demo_replica.ofrep_port, "/ofrep/v1/evaluate/flags/new-checkout")
    assert status == 200, body
    assert json.loads(body)["reason"] == "DEFAULT", body


def test_a_percent_encoded_key_is_decoded(demo_replica):
    status, _, body = post(demo_replica.ofrep_port, "/ofrep/v1/evaluate/flags/new%2Dcheckout", {"context": {}})
    assert status == 200, body
    assert json.loads(body)["key"] == "new-checkout", body


def test_error_statuses_and_bodies(demo_replica, locked_replica):
    status, _, body = post(demo_replica.ofrep_port, "/ofrep/v1/evaluate/flags/no-such-flag", {})
    assert status == 404, body
    answer = json.loads(body)
    assert (answer["key"], answer["errorCode"]) == ("no-such-flag", "FLAG_NOT_FOUND"), answer
    assert answer["errorDetails"], answer

    status, _, body = post(demo_replica.ofrep_port, "/ofrep/v1/evaluate/flags/banner", {"context": {"targetingKey": 7}})
    assert status == 400, body
    answer = json.loads(body)
    assert (answer["key"], answer["errorCode"]) == ("banner", "INVALID_CONTEXT"), answer
    assert "targetingKey" in answer["errorDetails"], answer

    status, _, body = post(demo_replica.ofrep_port, "/ofrep/v1/evaluate/flags/banner", {},
                           headers={"flagd-selector": "a=b,c=d"})
    assert status == 400, body
    assert json.loads(body)["errorCode"] == "INVALID_CONTEXT", body

    for headers, expected in [({}, 401), (bearer("not-a-token-0123456789abcdef"), 401), (bearer(EVAL_ELSEWHERE), 403)]:
        status, _, body = post(locked_replica.ofrep_port, "/ofrep/v1/evaluate/flags/banner", {}, headers)
        assert (status, body) == (expected, b""), headers
        status, _, body = post(locked_replica.ofrep_port, "/ofrep/v1/evaluate/flags", {}, headers)
        assert (status, body) == (expected, b""), headers


def bulk(port: int, context: dict, headers: dict | None = None):
    return post(port, "/ofrep/v1/evaluate/flags", {"context": context}, headers)


def test_bulk_evaluates_every_flag_of_the_namespace(demo_replica):
    status, headers, body = bulk(demo_replica.ofrep_port, {"targetingKey": "alice"})
    assert status == 200, body
    assert headers["content-type"].startswith("application/json"), headers
    flags = {f["key"]: f for f in json.loads(body)["flags"]}
    assert set(flags) == set(DEMO_FLAGS), flags
    assert (flags["new-checkout"]["value"], flags["new-checkout"]["reason"]) == (True, "TARGETING_MATCH")
    assert (flags["express-pay"]["value"], flags["express-pay"]["reason"]) == (True, "DEFAULT")
    assert (flags["legacy-search"]["variant"], flags["legacy-search"]["reason"]) == ("off", "DISABLED")


def test_bulk_answers_304_to_the_etag_of_the_same_answer(demo_replica):
    port = demo_replica.ofrep_port
    status, headers, body = bulk(port, {"targetingKey": "alice"})
    assert status == 200, body
    etag = headers.get("etag")
    assert etag, headers
    assert "etag" in headers.get("access-control-expose-headers", "").lower(), headers

    status, headers, body = bulk(port, {"targetingKey": "alice"}, {"If-None-Match": etag})
    assert (status, body) == (304, b""), (status, body)

    # The ETag is a hash of the answer (which holds the revision): a context with the same
    # results (bob is a beta tester too) shares it, one with other results does not.
    status, headers, body = bulk(port, {"targetingKey": "carol"}, {"If-None-Match": etag})
    assert status == 200, "another answer is another ETag"
    assert headers["etag"] != etag
    assert {f["key"]: f["variant"] for f in json.loads(body)["flags"]}["new-checkout"] == "off"


def test_a_write_to_the_namespace_changes_the_bulk_etag(scratch, stack):
    port = scratch.ofrep_port
    status, headers, _ = bulk(port, {})
    assert status == 200
    etag = headers["etag"]
    stack.update_flag(scratch.namespace, "banner", lambda f: f.update(default_variant="sale"))
    scratch.wait_revision(stack.revision, scratch.namespace)
    status, headers, body = bulk(port, {}, {"If-None-Match": etag})
    assert status == 200, "the old ETag no longer matches"
    assert headers["etag"] != etag
    assert {f["key"]: f["variant"] for f in json.loads(body)["flags"]}["banner"] == "sale"


# 429. A concurrency permit is held only while a call evaluates (microseconds), so nothing
# holds one deterministically: a replica limited to one call at a time is flooded with bulk
# evaluations of a namespace of 1,000 flags from 8 threads until it sheds, bounded in time.

@pytest.fixture(scope="module")
def shedding_replica(stack):
    flags = [{"key": f"f{i:04}", "type": "FLAG_TYPE_BOOLEAN", "enabled": True, "default_variant": "off",
              "disabled_variant": "off",
              "variants": [{"name": "on", "value": {"bool_value": True}}, {"name": "off", "value": {"bool_value": False}}],
              "rules": [{"constraints": [{"attribute": "plan", "operator": "OPERATOR_IN", "values": ["pro", "team"]}],
                         "serve": {"variant": "on"}}]} for i in range(1000)]
    stack.admin("ImportNamespace", {"namespace": "load", "bundle": {"namespace": {"key": "load"}, "flags": flags}})
    return stack.replica("shedding-replica", "--concurrency-limit", "1", "--flagd-default-namespace", "load",
                         "--anonymous-namespaces", "load").start(namespace="load")


class Flood:
    """Threads posting bulk evaluations until stopped; remembers the first 429."""

    def __init__(self, port: int, threads: int = 8):
        self.port = port
        self.stop = threading.Event()
        self.shed: tuple | None = None
        self.error: OSError | None = None
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def run(self):
        while not self.stop.is_set():
            try:
                status, headers, body = bulk(self.port, {"plan": "pro"})
            except OSError as error:
                self.error = error
                time.sleep(0.01)
                continue
            if status == 429 and self.shed is None:
                self.shed = (status, headers, body)

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=CALL_S)


def test_a_replica_that_sheds_answers_429_with_retry_after(shedding_replica):
    flood = Flood(shedding_replica.ofrep_port)
    try:
        wait_for(lambda: flood.shed, 20,
                 lambda: f"a 429 from a replica limited to one call at a time (last error: {flood.error})")
    finally:
        flood.close()
    _, headers, _ = flood.shed
    retry_after = headers.get("retry-after", "")
    assert retry_after.isdigit() and int(retry_after) >= 1, headers


def test_the_providers_pause_for_retry_after_once_shed(provider, shedding_replica, language):
    driver = provider(language, ofrep_config(shedding_replica))
    flood = Flood(shedding_replica.ofrep_port)
    try:
        deadline = time.monotonic() + 20
        while True:
            got = driver.eval("boolean", "f0001", context={"plan": "pro"})
            if got["errorCode"]:
                break
            assert time.monotonic() < deadline, "the provider never met a 429"
    finally:
        flood.close()
    assert (got["value"], got["reason"], got["errorCode"]) == (False, "ERROR", "GENERAL"), got
    # Within Retry-After the provider does not ask the replica at all.
    paused = driver.eval("boolean", "f0001", context={"plan": "pro"})
    assert paused["errorCode"] == "GENERAL" and "paused" in (paused["errorMessage"] or ""), paused
