"""Drives a Python OpenFeature provider for the tests (flagread/tests/openfeature), unchanged
and as an application would: `openfeature-sdk` with `openfeature-provider-flagd` (RPC resolver)
or `openfeature-provider-ofrep`. It speaks the same JSON-lines protocol as node/driver.mjs, so
one test body drives both languages.

Usage: driver.py '<config JSON>'. Config: {"provider": "flagd", "host", "port", "selector"?,
"token"?, "deadlineMs"?} or {"provider": "ofrep", "baseUrl", "headers"?}.
Prints {"ready": bool, "ms": <time set_provider_and_wait took>, "error"?} first, then one line
per provider event ({"event": "PROVIDER_CONFIGURATION_CHANGED", "flags": [...]}) and one per
command read from stdin: {"id", "op": "eval", "type": "boolean|string|integer|float|object",
"key", "default", "context"?} answers {"id", "value", "variant", "reason", "errorCode",
"errorMessage", "metadata"}; {"op": "quit"} shuts the SDK down and exits.
"""

import json
import sys
import threading
import time

from openfeature import api
from openfeature.evaluation_context import EvaluationContext
from openfeature.event import ProviderEvent

lock = threading.Lock()


def emit(message: dict):
    with lock:
        print(json.dumps(message), flush=True)


def provider(config: dict):
    if config["provider"] == "flagd":
        import grpc
        from openfeature.contrib.provider.flagd import FlagdProvider
        from openfeature.contrib.provider.flagd.config import ResolverType

        options = {"host": config["host"], "port": config["port"], "resolver_type": ResolverType.RPC}
        if config.get("selector"):
            options["selector"] = config["selector"]
        if config.get("deadlineMs"):
            options["deadline_ms"] = config["deadlineMs"]
        if config.get("token"):
            # The provider has no option for headers. Call credentials carry the token; gRPC
            # sends them only over a secure channel, and local credentials count as secure on
            # a loopback connection (in production: ssl_channel_credentials instead).
            options["channel_credentials"] = grpc.composite_channel_credentials(
                grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP),
                grpc.access_token_call_credentials(config["token"]),
            )
        return FlagdProvider(**options)
    from openfeature.contrib.provider.ofrep import OFREPProvider

    headers = config.get("headers") or {}
    return OFREPProvider(config["baseUrl"], headers_factory=lambda: dict(headers))


def name(value) -> str | None:
    """An enum member or a plain string as the plain string the protocol carries."""
    if value is None:
        return None
    return getattr(value, "value", value)


def evaluate(client, command: dict) -> dict:
    context = dict(command.get("context") or {})
    targeting_key = context.pop("targetingKey", None)
    ctx = EvaluationContext(targeting_key=targeting_key, attributes=context)
    method = {
        "boolean": client.get_boolean_details,
        "string": client.get_string_details,
        "integer": client.get_integer_details,
        "float": client.get_float_details,
        "object": client.get_object_details,
    }[command["type"]]
    details = method(command["key"], command["default"], ctx)
    return {
        "value": details.value,
        "variant": details.variant,
        "reason": name(details.reason),
        "errorCode": name(details.error_code),
        "errorMessage": details.error_message,
        "metadata": dict(details.flag_metadata or {}),
    }


def main():
    config = json.loads(sys.argv[1])
    for event in ProviderEvent:
        api.add_handler(
            event,
            lambda details, event=event: emit({"event": event.value, "flags": details.flags_changed}),
        )
    chosen = provider(config)
    started = time.monotonic()
    try:
        api.set_provider_and_wait(chosen)
        emit({"ready": True, "ms": (time.monotonic() - started) * 1000})
    except Exception as error:  # the test reads why
        emit({"ready": False, "ms": (time.monotonic() - started) * 1000, "error": repr(error)})
    client = api.get_client()
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "quit":
            break
        answer = evaluate(client, command)
        emit({"id": command["id"]} | answer)
    api.shutdown()


if __name__ == "__main__":
    main()
