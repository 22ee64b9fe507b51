"""What the flagd providers rely on but cannot show, checked with the flagd v2 stubs that ship
with openfeature-provider-flagd: the EventStream as Node's provider opens it (no selector, no
token), the event naming every flag after provider_ready, the change types of
`configuration_change`, keep_alive, the end of a stream at shutdown, and the status codes of
refused calls."""

import queue
import threading
import time

import grpc
import pytest
from google.protobuf import json_format

from conftest import CALL_S, DEMO_FLAGS, EVAL, EVAL_ELSEWHERE, authed


class Events:
    """An EventStream read by a thread into a queue."""

    def __init__(self, replica, metadata=()):
        self.call = replica.flagd.EventStream(replica.stack.pb.flagd.EventStreamRequest(), metadata=metadata,
                                              timeout=60)
        self.queue: queue.Queue = queue.Queue()
        threading.Thread(target=self.read, daemon=True).start()

    def read(self):
        try:
            for message in self.call:
                self.queue.put((message.type, json_format.MessageToDict(message.data)))
        except grpc.RpcError as error:
            self.queue.put(("ended", error.code()))

    def next(self, seconds: float = CALL_S, skip_keep_alive: bool = True):
        deadline = time.monotonic() + seconds
        while True:
            try:
                event = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no event within {seconds} s")
            if not (skip_keep_alive and event[0] == "keep_alive"):
                return event

    def ready(self) -> dict:
        """provider_ready, then the event naming every flag of the namespace; returns its flags."""
        assert self.next()[0] == "provider_ready"
        type_, data = self.next()
        assert type_ == "configuration_change", (type_, data)
        return data["flags"]

    def close(self):
        self.call.cancel()


def test_an_eventstream_without_selector_is_ready_names_every_flag_then_follows_the_default_namespace_only(
        scratch, stack):
    started = time.monotonic()
    events = Events(scratch)
    try:
        assert events.next()[0] == "provider_ready"
        assert time.monotonic() - started < 0.5, "provider_ready within the providers' 500 ms deadline"
        kind, data = events.next()
        assert (kind, data["flags"]) == ("configuration_change", {key: {"type": "update"} for key in DEMO_FLAGS})

        # The demo namespace is served by the same replica but is not the default one.
        other = stack.revision
        stack.load_demo(f"{scratch.namespace}-other")
        assert stack.revision > other

        revision = stack.update_flag(scratch.namespace, "banner", lambda f: f.update(default_variant="sale"))
        type_, data = events.next()
        assert (type_, data) == ("configuration_change", {"flags": {"banner": {"type": "update"}}}), \
            f"at revision {revision} (a write to another namespace must not be announced)"
    finally:
        events.close()


def test_configuration_change_says_write_update_or_delete(scratch, stack):
    events = Events(scratch)
    try:
        assert set(events.ready()) == set(DEMO_FLAGS)
        stack.admin("CreateFlag", {"flag": {
            "namespace": scratch.namespace, "key": "fresh", "type": "FLAG_TYPE_STRING", "enabled": True,
            "variants": [{"name": "a", "value": {"string_value": "a"}}], "default_variant": "a", "disabled_variant": "a"}})
        assert events.next()[1]["flags"] == {"fresh": {"type": "write"}}
        stack.admin("SetFlagEnabled", {"namespace": scratch.namespace, "key": "fresh", "enabled": False})
        assert events.next()[1]["flags"] == {"fresh": {"type": "update"}}
        stack.admin("DeleteFlag", {"namespace": scratch.namespace, "key": "fresh"})
        assert events.next()[1]["flags"] == {"fresh": {"type": "delete"}}
    finally:
        events.close()


def test_a_replica_shutting_down_says_so_and_ends_the_stream_with_an_error(scratch):
    # Node's provider reconnects only after a stream that ends with an error status.
    events = Events(scratch)
    assert set(events.ready()) == set(DEMO_FLAGS)
    scratch.terminate()
    assert events.next()[0] == "provider_shutdown"
    assert events.next() == ("ended", grpc.StatusCode.UNAVAILABLE)


def resolve(replica, metadata=()):
    pb = replica.stack.pb
    return replica.flagd.ResolveBoolean(pb.flagd.ResolveBooleanRequest(flag_key="new-checkout"),
                                        metadata=metadata, timeout=CALL_S)


@pytest.mark.parametrize("metadata,code", [
    ((), grpc.StatusCode.UNAUTHENTICATED),
    (authed("not-a-token-0123456789abcdef"), grpc.StatusCode.UNAUTHENTICATED),
    (authed(EVAL_ELSEWHERE), grpc.StatusCode.PERMISSION_DENIED),
    ((("flagd-selector", "foo=bar"),) + authed(EVAL), grpc.StatusCode.INVALID_ARGUMENT),
], ids=["no-token", "unknown-token", "other-namespace", "bad-selector"])
def test_refused_calls_have_the_contracts_status_codes(locked_replica, metadata, code):
    with pytest.raises(grpc.RpcError) as refused:
        resolve(locked_replica, metadata)
    assert refused.value.code() == code, refused.value.details()
    stream = locked_replica.flagd.EventStream(locked_replica.stack.pb.flagd.EventStreamRequest(),
                                              metadata=metadata, timeout=CALL_S)
    with pytest.raises(grpc.RpcError) as refused:
        next(stream)
    assert refused.value.code() == code, refused.value.details()


def test_a_token_reads_the_namespace_and_values_are_always_set(locked_replica):
    answer = resolve(locked_replica, authed(EVAL))
    assert answer.HasField("value") and answer.HasField("variant"), answer
    assert (answer.value, answer.variant, answer.reason) == (False, "off", "DEFAULT"), answer


def test_an_idle_eventstream_gets_keep_alive_events(stack):
    replica = stack.replica("keepalive-replica", "--flagd-default-namespace", "demo", "--anonymous-namespaces", "demo",
                            "--flagd-keepalive-s", "1").start()
    events = Events(replica)
    try:
        assert set(events.ready()) == set(DEMO_FLAGS)
        started = time.monotonic()
        assert events.next(seconds=5, skip_keep_alive=False)[0] == "keep_alive"
        assert events.next(seconds=5, skip_keep_alive=False)[0] == "keep_alive"
        assert 1.5 < time.monotonic() - started < 4, "two keep_alive events, one per idle second"
    finally:
        events.close()
        replica.terminate()
