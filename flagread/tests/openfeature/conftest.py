"""Harness of the OpenFeature provider tests: the real binaries (flagwrite and flagread from
$FLAGSTREAM_BIN_DIR) on free 127.0.0.1 ports with a tokens file, the demo namespace of
scripts/demo/demo.json loaded through FlagAdmin, and the providers driven unchanged: the
Python ones through python/driver.py, the Node ones through node/driver.mjs (npm packages
installed in node/ by scripts/test.sh), both as subprocesses speaking JSON lines.

A FlagEval client generated from proto/ by grpcio-tools gives the expected results; the flagd
v2 stubs that ship with openfeature-provider-flagd make raw flagd calls.
"""

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "demo"))
import demo  # noqa: E402

IN_CI = bool(os.environ.get("CI"))

ADMIN = "ops-secret-0123456789abcdef"
SYNC = "replica-secret-0123456789abcdef"
EVAL = "app-secret-0123456789abcdef"
EVAL_DEMO = "demo-app-secret-0123456789abcdef"
EVAL_ELSEWHERE = "other-app-secret-0123456789abcdef"
TOKENS = f"""\
# name     scopes           secret
ops        admin            {ADMIN}
replicas   sync             {SYNC}
app        eval             {EVAL}
demo-app   eval:demo        {EVAL_DEMO}
other-app  eval:elsewhere   {EVAL_ELSEWHERE}
"""

# Every flag of the demo namespace with its OpenFeature type.
DEMO_FLAGS = {
    "new-checkout": "boolean",
    "banner": "string",
    "page-size": "float",
    "theme": "object",
    "max-items": "integer",
    "discount": "float",
    "legacy-search": "boolean",
    "express-pay": "boolean",
}
THEME_DARK = {"mode": "dark", "accent": "#3b82f6", "compact": False, "fontScale": 1.25}
DEFAULTS = {"boolean": False, "string": "fallback", "integer": -1, "float": -1.5, "object": {"fallback": True}}

# Bounds on every wait of the harness.
START_S = 20
CALL_S = 10


def kind(value, language: str) -> str:
    """The type of a value as the language's SDK sees it: Python keeps int and float apart
    (ResolveInt, ResolveFloat), JavaScript has one number type."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)) and language == "node":
        return "number"
    return type(value).__name__


def missing(what: str):
    """Something a test needs is absent: fail in CI, otherwise skip with a notice."""
    if IN_CI:
        pytest.fail(f"{what} is required in CI")
    pytest.skip(f"{what} not available")


def binary(name: str) -> Path:
    """The binary to drive: FLAGSTREAM_BIN_DIR, else target/release, else target/debug."""
    dirs = [os.environ.get("FLAGSTREAM_BIN_DIR"), ROOT / "target" / "release", ROOT / "target" / "debug"]
    for d in dirs:
        if d and (Path(d) / name).is_file():
            return Path(d) / name
    missing(f"the {name} binary (cargo build -p {name})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, seconds: float, what):
    """Polls `condition` every 20 ms until it returns something true; fails after `seconds`
    naming `what` (a string, or a function giving one at that time)."""
    deadline = time.monotonic() + seconds
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds} s waiting for {what() if callable(what) else what}")
        time.sleep(0.02)


def authed(token: str | None) -> tuple:
    return (("authorization", f"Bearer {token}"),) if token else ()


@pytest.fixture(scope="session")
def pb(tmp_path_factory):
    """The flagstream protos compiled by grpcio-tools: a namespace with the admin, eval and
    types modules, and the flagd v2 modules the flagd provider ships."""
    try:
        from grpc_tools import protoc
    except ImportError:
        missing("grpcio-tools (scripts/test.sh installs it)")
    out = tmp_path_factory.mktemp("pb")
    protos = sorted(str(p) for p in (ROOT / "proto" / "flagstream" / "v1").glob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    code = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"-I{include}", f"--python_out={out}",
                        f"--grpc_python_out={out}", *protos])
    assert code == 0, "grpcio-tools compiles proto/flagstream/v1"
    sys.path.insert(0, str(out))
    from flagstream.v1 import admin_pb2, admin_pb2_grpc, eval_pb2, eval_pb2_grpc, types_pb2
    from openfeature.schemas.protobuf.flagd.evaluation.v2 import evaluation_pb2, evaluation_pb2_grpc

    class Pb:
        pass

    p = Pb()
    p.admin, p.admin_grpc, p.eval, p.eval_grpc, p.types = admin_pb2, admin_pb2_grpc, eval_pb2, eval_pb2_grpc, types_pb2
    p.flagd, p.flagd_grpc = evaluation_pb2, evaluation_pb2_grpc
    return p


class Proc:
    """A child process with its log file; killed at teardown if still running."""

    def __init__(self, name: str, argv: list[str], log: Path):
        self.name = name
        self.log = log
        self.popen = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(log, "ab"),
                                      env=os.environ | {"RUST_LOG": os.environ.get("RUST_LOG", "info")})

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self):
        if self.alive():
            self.popen.kill()
        self.popen.wait(timeout=CALL_S)

    def terminate(self, seconds: float = 25):
        """SIGTERM and a clean exit within `seconds`."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
        try:
            code = self.popen.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            pytest.fail(f"{self.name} did not drain within {seconds} s")
        assert code == 0, f"{self.name} exited with {code}: {self.tail()}"

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def healthy(port: int, service: str) -> bool:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        request = service.encode()
        payload = (b"\x0a" + bytes([len(request)]) + request) if request else b""
        check = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=lambda b: b,
                                    response_deserializer=lambda b: b)
        return check(payload, timeout=1)[:2] == b"\x08\x01"
    except grpc.RpcError:
        return False
    finally:
        channel.close()


def flatten(value, prefix: str = ""):
    """(name, string) pairs of OpenFeature attributes as flagread turns them into properties."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from flatten(v, f"{prefix}{k}" if not prefix else f"{prefix}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from flatten(v, f"{prefix}.{i}")
    elif isinstance(value, bool):
        yield prefix, "true" if value else "false"
    elif isinstance(value, (int, float)):
        yield prefix, str(int(value)) if float(value).is_integer() else repr(float(value))
    elif value is not None:
        yield prefix, value


class Replica:
    """A flagread process on fixed ports, which survive a restart."""

    def __init__(self, stack: "Stack", name: str, args: list[str]):
        self.stack = stack
        self.name = name
        self.port = free_port()
        self.ofrep_port = free_port()
        self.args = args
        self.proc: Proc | None = None
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.eval = stack.pb.eval_grpc.FlagEvalStub(self.channel)
        self.flagd = stack.pb.flagd_grpc.ServiceStub(self.channel)

    @property
    def ofrep_url(self) -> str:
        return f"http://127.0.0.1:{self.ofrep_port}"

    def start(self, revision: int | None = None, namespace: str = demo.NAMESPACE) -> "Replica":
        """Starts the process and waits until it serves `namespace` at `revision` (default:
        the writer's last write)."""
        d = self.stack.dir
        argv = [str(binary("flagread")), "--listen", f"127.0.0.1:{self.port}",
                "--upstream", f"http://127.0.0.1:{self.stack.writer_port}", "--sync-token", SYNC,
                "--tokens-file", str(d / "tokens"), "--snapshot-file", str(d / f"{self.name}.snapshot"),
                "--metrics-listen", "127.0.0.1:0", "--ofrep-listen", f"127.0.0.1:{self.ofrep_port}",
                "--backoff-min-ms", "20", "--backoff-max-ms", "300", *self.args]
        self.proc = Proc(self.name, argv, d / f"{self.name}.log")
        self.wait_revision(self.stack.revision if revision is None else revision, namespace)
        return self

    def wait_revision(self, revision: int, namespace: str = demo.NAMESPACE):
        """Waits until FlagEval answers at `revision` or later (read your writes)."""
        pb = self.stack.pb

        def answered():
            assert self.proc.alive(), f"{self.name} exited: {self.proc.tail()}"
            request = pb.eval.EvaluateRequest(namespace=namespace, flag_key="theme", min_revision=revision)
            try:
                self.eval.Evaluate(request, metadata=authed(EVAL), timeout=2)
                return True
            except grpc.RpcError as error:
                # NOT_FOUND comes after the wait for the revision: a namespace without "theme".
                return error.code() == grpc.StatusCode.NOT_FOUND

        wait_for(answered, START_S, f"{self.name} to serve revision {revision}")

    def evaluate(self, key: str, context: dict | None = None, namespace: str = demo.NAMESPACE):
        """FlagEval.Evaluate, with an OpenFeature context mapped as the contract says:
        well-known names to their fields, every other attribute to properties (numbers in
        their shortest form, bools as true/false, objects and lists flattened with dots)."""
        pb = self.stack.pb
        context = dict(context or {})
        ctx = pb.types.Context(targeting_key=context.pop("targetingKey", ""))
        for field, name in [("userId", "user_id"), ("sessionId", "session_id")]:
            if field in context:
                setattr(ctx, name, context.pop(field))
        for k, v in flatten(context):
            ctx.properties[k] = v
        request = pb.eval.EvaluateRequest(namespace=namespace, flag_key=key, context=ctx)
        return self.eval.Evaluate(request, metadata=authed(EVAL), timeout=CALL_S)

    def kill(self):
        self.proc.kill()

    def terminate(self):
        self.proc.terminate()


class Stack:
    """One flagwrite with the demo namespace loaded, and the replicas the tests start."""

    def __init__(self, directory: Path, pb):
        self.dir = directory
        self.pb = pb
        (directory / "tokens").write_text(TOKENS)
        self.writer_port = free_port()
        self.writer = Proc("flagwrite", [
            str(binary("flagwrite")), "--listen", f"127.0.0.1:{self.writer_port}",
            "--data-dir", str(directory / "flagwrite"), "--tokens-file", str(directory / "tokens"),
            "--metrics-listen", "127.0.0.1:0", "--heartbeat-ms", "200"], directory / "flagwrite.log")
        wait_for(lambda: healthy(self.writer_port, ""), START_S, "flagwrite to be SERVING")
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.writer_port}")
        self.admin_stub = pb.admin_grpc.FlagAdminStub(self.channel)
        self.revision = 0
        self.replicas: list[Replica] = []

    def admin(self, rpc: str, request: dict):
        """One FlagAdmin call from its proto3 JSON request; remembers the revision it took."""
        message = json_format.ParseDict(request, getattr(self.pb.admin, f"{rpc}Request")())
        response = getattr(self.admin_stub, rpc)(message, metadata=authed(ADMIN), timeout=CALL_S)
        self.revision = max(self.revision, response.revision)
        return response

    def load_demo(self, namespace: str = demo.NAMESPACE) -> int:
        for rpc, request in demo.calls(namespace):
            self.admin(rpc, request)
        return self.revision

    def get_flag(self, namespace: str, key: str) -> dict:
        flag = self.admin_stub.GetFlag(self.pb.admin.GetFlagRequest(namespace=namespace, key=key),
                                       metadata=authed(ADMIN), timeout=CALL_S)
        return json_format.MessageToDict(flag, preserving_proto_field_name=True)

    def update_flag(self, namespace: str, key: str, change) -> int:
        """UpdateFlag with `change` applied to the stored flag (a dict); returns the revision."""
        flag = self.get_flag(namespace, key)
        flag.pop("stamp", None)
        change(flag)
        return self.admin("UpdateFlag", {"flag": flag}).revision

    def replica(self, name: str, *args: str) -> Replica:
        replica = Replica(self, name, list(args))
        self.replicas.append(replica)
        return replica

    def close(self):
        for replica in self.replicas:
            if replica.proc and replica.proc.alive():
                replica.terminate()
            replica.channel.close()
        self.channel.close()
        self.writer.terminate()


@pytest.fixture(scope="session")
def stack(tmp_path_factory, pb):
    """The writer with the demo namespace, shared by every test; tests that change flags
    load a copy of the demo under a namespace of their own."""
    s = Stack(tmp_path_factory.mktemp("stack"), pb)
    try:
        s.load_demo()
        yield s
    finally:
        s.close()


@pytest.fixture(scope="session")
def demo_replica(stack):
    """A replica serving the demo namespace, unchanged for the whole session: flagd and
    OFREP callers that name no namespace get `demo`, and may read it without a token (and
    `not-yet-created`, a namespace that does not exist)."""
    return stack.replica("demo-replica", "--flagd-default-namespace", "demo",
                         "--anonymous-namespaces", "demo,not-yet-created").start()


@pytest.fixture(scope="session")
def locked_replica(stack):
    """A replica that serves the demo namespace to token holders only."""
    return stack.replica("locked-replica", "--flagd-default-namespace", "demo").start()


_namespaces = iter(range(1, 1_000_000))


@pytest.fixture
def scratch(stack):
    """A fresh copy of the demo under its own namespace, and a replica whose default and
    anonymous namespace it is (the demo namespace is anonymous there too): for tests that
    change flags (Node's flagd provider opens its EventStream without a selector, so only
    the default namespace reaches it)."""
    namespace = f"scratch-{next(_namespaces)}"
    stack.load_demo(namespace)
    replica = stack.replica(namespace, "--flagd-default-namespace", namespace,
                            "--anonymous-namespaces", f"{namespace},demo").start(namespace=namespace)
    replica.namespace = namespace
    yield replica
    if replica.proc.alive():
        replica.terminate()


class Driver:
    """A provider in a child process (python/driver.py or node/driver.mjs)."""

    def __init__(self, language: str, config: dict, log: Path):
        if language == "python":
            argv = [sys.executable, str(HERE / "python" / "driver.py"), json.dumps(config)]
            cwd = HERE / "python"
        else:
            node = shutil.which("node")
            if not node:
                missing("node")
            if not (HERE / "node" / "node_modules" / "@openfeature" / "flagd-provider").is_dir():
                missing("the npm packages (cd flagread/tests/openfeature/node && npm ci)")
            argv = [node, str(HERE / "node" / "driver.mjs"), json.dumps(config)]
            cwd = HERE / "node"
        self.language = language
        self.log = log
        self.popen = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=open(log, "ab"), text=True, bufsize=1)
        self.lines: queue.Queue = queue.Queue()
        self.events: list[dict] = []
        self.answers: dict[int, dict] = {}
        self.next_id = 0
        threading.Thread(target=self._read, daemon=True).start()
        self.hello = self._next(lambda m: "ready" in m, START_S, "the provider's set-up to end")

    def _read(self):
        for line in self.popen.stdout:
            try:
                self.lines.put(json.loads(line))
            except json.JSONDecodeError:
                self.lines.put({"garbage": line})
        self.lines.put({"exited": self.popen.wait()})

    def _drain(self, message: dict):
        if "event" in message:
            self.events.append(message)
        elif "id" in message:
            self.answers[message["id"]] = message
        elif "exited" in message:
            pytest.fail(f"the {self.language} driver exited ({message['exited']}): {self.stderr()}")

    def _next(self, wanted, seconds: float, what: str) -> dict:
        deadline = time.monotonic() + seconds
        while True:
            try:
                message = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"{self.language}: timed out after {seconds} s waiting for {what}; stderr: {self.stderr()}")
            if wanted(message):
                return message
            self._drain(message)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def eval(self, type_: str, key: str, default=None, context: dict | None = None) -> dict:
        self.next_id += 1
        command = {"id": self.next_id, "op": "eval", "type": type_, "key": key,
                   "default": DEFAULTS[type_] if default is None else default, "context": context or {}}
        self.popen.stdin.write(json.dumps(command) + "\n")
        self.popen.stdin.flush()
        return self._next(lambda m: m.get("id") == command["id"], CALL_S * 2, f"the answer to {command}")

    def wait_event(self, wanted, seconds: float, what: str) -> dict:
        """The first event, since the last call of wait_event, for which `wanted` is true."""
        for i, event in enumerate(self.events):
            if wanted(event):
                del self.events[: i + 1]
                return event
        self.events.clear()
        return self._next(lambda m: "event" in m and wanted(m), seconds, what)

    def forget_events(self):
        """Drops the events received so far: wait_event then sees only later ones."""
        while True:
            try:
                self._drain(self.lines.get_nowait())
            except queue.Empty:
                break
        self.events.clear()

    def changed(self, seconds: float = CALL_S) -> set[str]:
        """The flags named by the next CONFIGURATION_CHANGED event."""
        event = self.wait_event(lambda e: e["event"] == "PROVIDER_CONFIGURATION_CHANGED", seconds,
                                "a CONFIGURATION_CHANGED event")
        return set(event["flags"] or [])

    def close(self):
        if self.popen.poll() is None:
            try:
                self.popen.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.popen.stdin.flush()
                self.popen.wait(timeout=CALL_S)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.popen.kill()
                self.popen.wait()


@pytest.fixture
def provider(tmp_path):
    """Starts providers: provider(language, config) -> Driver; all closed at teardown."""
    started: list[Driver] = []

    def start(language: str, config: dict) -> Driver:
        driver = Driver(language, config, tmp_path / f"{language}-{len(started)}.log")
        started.append(driver)
        return driver

    yield start
    for driver in started:
        driver.close()


def flagd_config(replica: Replica, **extra) -> dict:
    return {"provider": "flagd", "host": "127.0.0.1", "port": replica.port} | extra


def ofrep_config(replica: Replica, **extra) -> dict:
    return {"provider": "ofrep", "baseUrl": replica.ofrep_url} | extra
