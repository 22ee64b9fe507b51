"""The demo namespace, one place for everyone who loads it: scripts/local-stack.sh and the
OpenFeature tests (flagread/tests/openfeature). demo.json lists FlagAdmin calls, each an RPC
name and its request body in proto3 JSON, applied in order.

`python3 demo.py [NAMESPACE]` prints one line per call, `<rpc>\t<request as one line of JSON>`,
for a shell loop around grpcurl; NAMESPACE (default: demo) renames the namespace everywhere.
"""

import json
import sys
from pathlib import Path

FILE = Path(__file__).with_name("demo.json")
NAMESPACE = "demo"


def calls(namespace: str = NAMESPACE) -> list[tuple[str, dict]]:
    """(rpc, request) pairs creating the demo namespace under the name `namespace`."""
    result = []
    for call in json.loads(FILE.read_text()):
        request = call["request"]
        if "namespace" in request:
            request["namespace"]["key"] = namespace
        for kind in ("flag", "segment"):
            if kind in request:
                request[kind]["namespace"] = namespace
        result.append((call["rpc"], request))
    return result


if __name__ == "__main__":
    for rpc, request in calls(sys.argv[1] if len(sys.argv) > 1 else NAMESPACE):
        print(f"{rpc}\t{json.dumps(request, separators=(',', ':'))}")
