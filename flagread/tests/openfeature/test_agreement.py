"""The providers agree with FlagEval.Evaluate: for every flag of the demo namespace and several
contexts, the flagd and OFREP providers of both languages return FlagEval's value and variant,
and its reason under the contract's mapping: PREREQUISITE_FAILED is DISABLED; FlagEval's STATIC
(no rules) is DEFAULT for a flag with prerequisites, whose result depends on the context; a
flagd provider may answer CACHED where the contract says STATIC, since it caches those by key.
A split without a targeting key, user or session chooses at random: only its reason and
that the variant is the flag's are compared."""

import pytest
from google.protobuf import json_format

from conftest import DEMO_FLAGS, flagd_config, ofrep_config

CONTEXTS = [
    {},
    {"targetingKey": "alice"},
    {"targetingKey": "bob", "plan": "free"},
    {"targetingKey": "carol", "plan": "pro"},
    {"targetingKey": "dave", "plan": "pro", "country": "FR"},
    {"targetingKey": "erin", "country": "NL"},
    {"targetingKey": "frank", "plan": "team", "country": "US"},
    {"userId": "bob"},
    # Typed attributes as the SDKs send them: numbers, bools, objects and lists.
    {"targetingKey": "henry", "seats": 64, "admin": True, "user": {"plan": "pro", "tags": ["a", "b"]}},
    {"targetingKey": "ivy", "seats": 49.5, "admin": False},
    {"targetingKey": "jack", "seats": 50},
]
# NUMBER flags are read as floats: ResolveFloat serves every number, OFREP has no integers.
TYPES = {key: "float" if type_ == "integer" else type_ for key, type_ in DEMO_FLAGS.items()}


STICKY = ("targetingKey", "userId", "sessionId")


def expected(replica, key: str, context: dict) -> dict:
    answer = replica.evaluate(key, context)
    reason = replica.stack.pb.eval.Reason.Name(answer.reason).removeprefix("REASON_")
    if reason == "PREREQUISITE_FAILED":
        reason = "DISABLED"
    if reason == "STATIC" and replica.stack.get_flag("demo", key).get("prerequisites"):
        reason = "DEFAULT"
    value = json_format.MessageToDict(answer.value, preserving_proto_field_name=True)
    (value,) = value.values()
    return {"value": value, "variant": answer.variant, "reason": reason}


@pytest.mark.parametrize("language", ["python", "node"])
@pytest.mark.parametrize("protocol", ["flagd", "ofrep"])
def test_every_demo_flag_agrees_with_flageval_for_every_context(provider, demo_replica, language, protocol):
    config = (flagd_config if protocol == "flagd" else ofrep_config)(demo_replica)
    driver = provider(language, config)
    assert driver.hello["ready"], driver.hello
    disagreements = []
    for context in CONTEXTS:
        for key, type_ in TYPES.items():
            want = expected(demo_replica, key, context)
            got = driver.eval(type_, key, context=context)
            got = {"value": got["value"], "variant": got["variant"], "reason": got["reason"]}
            if protocol == "flagd" and want["reason"] == "STATIC" and got["reason"] == "CACHED":
                got["reason"] = "STATIC"
            if want["reason"] == "SPLIT" and not any(k in context for k in STICKY):
                flag = demo_replica.stack.get_flag("demo", key)
                assert got["variant"] in {v["name"] for v in flag["variants"]}, (key, got)
                got["value"], got["variant"] = want["value"], want["variant"]
            if got != want:
                disagreements.append(f"{key} {context}: FlagEval {want}, provider {got}")
    assert not disagreements, "\n".join(disagreements)
