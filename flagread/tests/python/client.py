"""A FlagEval client generated from proto/ alone (grpcio-tools), driven by tests/clients.rs.

Usage: client.py <generated-code-dir> <host:port>
Calls Evaluate and EvaluateAll, prints one line per result, then opens a Watch, prints
"WATCHING <revision>" and waits for the next event, printing "CHANGED <revision> <keys>".
"""
import sys

sys.path.insert(0, sys.argv[1])

import grpc  # noqa: E402
from flagstream.v1 import eval_pb2, eval_pb2_grpc, types_pb2  # noqa: E402


def main():
    channel = grpc.insecure_channel(sys.argv[2])
    stub = eval_pb2_grpc.FlagEvalStub(channel)
    context = types_pb2.Context(user_id="u1", properties={"plan": "pro"})

    one = stub.Evaluate(eval_pb2.EvaluateRequest(namespace="prod", flag_key="a", context=context), timeout=10)
    print(f"EVALUATE {one.flag_key} {one.variant} {one.value.bool_value} {eval_pb2.Reason.Name(one.reason)} {one.revision}")

    try:
        stub.Evaluate(eval_pb2.EvaluateRequest(namespace="prod", flag_key="nope"), timeout=10)
        print("MISSING no-error")
    except grpc.RpcError as error:
        print(f"MISSING {error.code().name}")

    every = stub.EvaluateAll(eval_pb2.EvaluateAllRequest(namespace="prod", context=context), timeout=10)
    print("ALL " + " ".join(f"{r.flag_key}={r.variant}" for r in every.results))
    sys.stdout.flush()

    events = stub.Watch(eval_pb2.WatchRequest(namespace="prod", context=context), timeout=30)
    first = next(events)
    print(f"WATCHING {first.revision}", flush=True)
    change = next(events)
    results = ",".join(f"{r.flag_key}={r.variant}" for r in change.results)
    print(f"CHANGED {change.revision} {','.join(change.changed_flags)} {results}", flush=True)
    events.cancel()


if __name__ == "__main__":
    main()
