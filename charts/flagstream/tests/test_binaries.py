"""The rendered manifests drive the real binaries. Each test renders the chart,
takes the writer's and the replicas' containers (command, args, env, ports,
volume mounts, probes) and runs them as local processes with exactly those
settings: Secret volumes become files under a temporary root at their mount
paths, Service names map to 127.0.0.1, and listening on 0.0.0.0 becomes
127.0.0.1. Then it checks what the kubelet would (each probe, as the kubelet
runs it) and follows NOTES.txt with grpcurl as a new user would."""

import os
import re
import http.client
import shlex
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from conftest import binary, free_port, grpcurl, missing, render


def health(port: int, service: str, timeout: float, creds=None, server_name=None) -> bool:
    """The kubelet's gRPC probe: Health/Check, success only on SERVING."""
    request = service.encode()
    payload = (b"\x0a" + bytes([len(request)]) + request) if request else b""
    target = f"127.0.0.1:{port}"
    if creds:
        channel = grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", server_name)])
    else:
        channel = grpc.insecure_channel(target)
    try:
        check = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=lambda b: b, response_deserializer=lambda b: b)
        answer = check(payload, timeout=timeout)
        return answer[:2] == b"\x08\x01"
    except grpc.RpcError:
        return False
    finally:
        channel.close()


class Container:
    """A rendered container run as a local process."""

    def __init__(self, rendered, kind, component, root: Path, secrets: dict, services: set[str], container=0):
        obj = rendered.one(kind, component)
        self.pod = obj["spec"] if kind == "Pod" else obj["spec"]["template"]["spec"]
        self.spec = self.pod["containers"][container]
        self.root = root / f"{component}-{self.spec['name']}"
        self.services = services
        self.component = component
        self.mounts = {m["mountPath"]: m["name"] for m in self.spec.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in self.pod.get("volumes", [])}
        for path, name in self.mounts.items():
            target = self.local(path)
            target.mkdir(parents=True, exist_ok=True)
            volume = volumes.get(name, {})
            if "secret" in volume:
                data = secrets[volume["secret"]["secretName"]]
                items = volume["secret"].get("items") or [{"key": k, "path": k} for k in data]
                for item in items:
                    (target / item["path"]).write_text(data[item["key"]])
        self.env = {}
        for e in self.spec.get("env", []):
            if "value" in e:
                self.env[e["name"]] = self.rewrite(e["value"])
            else:
                ref = e["valueFrom"]["secretKeyRef"]
                self.env[e["name"]] = secrets[ref["name"]][ref["key"]]
        self.ports = {p["name"]: p["containerPort"] for p in self.spec.get("ports", [])}
        self.grace = self.pod.get("terminationGracePeriodSeconds", 30)
        self.process = None
        self.log = root / f"{component}.log"

    def local(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def rewrite(self, value: str) -> str:
        """Mount paths into the temporary root, 0.0.0.0 and Service names to 127.0.0.1."""
        for mount in sorted(self.mounts, key=len, reverse=True):
            if value == mount or value.startswith(mount + "/"):
                return str(self.local(mount)) + value[len(mount):]
        value = value.replace("0.0.0.0:", "127.0.0.1:")
        for name in self.services:
            value = re.sub(rf"(^|://){re.escape(name)}(:)", r"\g<1>127.0.0.1\2", value)
        return value

    def argv(self, command: list[str]) -> list[str]:
        program = binary(Path(command[0]).name)
        return [str(program)] + [self.rewrite(a) for a in command[1:]]

    def start(self):
        argv = self.argv(self.spec["command"] + self.spec.get("args", []))
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")} | self.env
        self.process = subprocess.Popen(argv, env=env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)

    def probe(self, name: str, **tls) -> bool:
        probe = self.spec[name]
        if "grpc" in probe:
            return health(probe["grpc"]["port"], probe["grpc"].get("service", ""), probe["timeoutSeconds"], **tls)
        argv = self.argv(probe["exec"]["command"])
        try:
            return subprocess.run(argv, capture_output=True, timeout=probe["timeoutSeconds"] + 1).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def stop(self) -> float:
        """SIGTERM, as the kubelet sends it; returns the seconds the process took to exit."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=self.grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"{self.component} outlived terminationGracePeriodSeconds ({self.grace} s)")
        assert code == 0, f"{self.component} exited with {code}: {self.log.read_text()[-2000:]}"
        return time.monotonic() - started

    def move_listeners(self, ports: dict[str, int]):
        """Each pod has a network namespace of its own; on one host, a second
        Deployment rendered with the same ports listens on others. Moves the
        listen addresses and the probes to `ports` (by port name), leaving every
        address it connects to (its upstream) as rendered."""
        moves = {self.ports[name]: port for name, port in ports.items()}
        listen = {"grpc": "FLAGREAD_LISTEN", "metrics": "FLAGREAD_METRICS_LISTEN", "ofrep": "FLAGREAD_OFREP_LISTEN"}
        for name, port in ports.items():
            assert self.env[listen[name]] == f"127.0.0.1:{self.ports[name]}"
            self.env[listen[name]] = f"127.0.0.1:{port}"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            spec = self.spec[probe]
            if "grpc" in spec:
                spec["grpc"]["port"] = moves.get(spec["grpc"]["port"], spec["grpc"]["port"])
            else:
                spec["exec"]["command"] = [re.sub(r"^127\.0\.0\.1:(\d+)$", lambda m: f"127.0.0.1:{moves.get(int(m[1]), m[1])}", a)
                                           for a in spec["exec"]["command"]]
        self.ports = {name: moves.get(port, port) for name, port in self.ports.items()}

    def kill(self):
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def make_certs(directory: Path, names: list[str]):
    """A CA, a certificate per server name (server and client use) and a client certificate."""
    if not shutil_which("openssl"):
        missing("openssl")
    run = lambda *args: subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
        "-subj", "/CN=flagstream test CA", "-keyout", "ca.key", "-out", "ca.crt")
    for name in names + ["client"]:
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")
        (directory / f"{name}.ext").write_text(
            f"subjectAltName=DNS:{name}\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n"
        )
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt")


def backup_and_restore(directory: Path, port: int, admin: str):
    """The README's backup and restore commands, as written, against the writer."""
    readme = (Path(__file__).parents[3] / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", readme, re.S)
    (block,) = [b for b in blocks if "ExportNamespace" in b]
    block = block.replace("localhost:50051", f"localhost:{port}")
    backup, restore = block.split("# restore", 1)
    env = os.environ | {"ADMIN": admin, "PATH": f"{Path(grpcurl()).parent}:{os.environ['PATH']}"}
    if not shutil_which("jq"):
        missing("jq")
    sh = lambda script: subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=directory, env=env,
                                       capture_output=True, text=True, timeout=60)
    done = sh(backup)
    assert done.returncode == 0, done.stderr
    assert "new-checkout" in (directory / "production.json").read_text()
    call = lambda method, body: subprocess.run(
        [grpcurl(), "-plaintext", "-H", f"authorization: Bearer {admin}", "-d", body, f"localhost:{port}",
         f"flagstream.v1.FlagAdmin/{method}"], capture_output=True, text=True, timeout=20)
    assert call("DeleteFlag", '{"namespace": "production", "key": "new-checkout"}').returncode == 0
    assert call("GetFlag", '{"namespace": "production", "key": "new-checkout"}').returncode != 0
    done = sh("# restore" + restore)
    assert done.returncode == 0, done.stderr
    back = call("GetFlag", '{"namespace": "production", "key": "new-checkout"}')
    assert back.returncode == 0 and '"defaultVariant": "on"' in back.stdout, back.stderr


def shutil_which(name):
    import shutil

    return shutil.which(name)


@pytest.mark.parametrize("variant", ["plaintext", "tls"])
def test_the_chart_runs_the_binaries(chart, tmp_path, variant):
    ports = {k: free_port() for k in ("wg", "wm", "rg", "rm", "ro")}
    values = {
        "auth": {"tokens": {"admin": "admin-" + "a" * 20, "sync": "sync-" + "s" * 20, "eval": "eval-" + "e" * 20}},
        "flagwrite": {"ports": {"grpc": ports["wg"], "metrics": ports["wm"]}, "config": {"shutdownGraceSecs": 5}},
        "flagread": {
            "ports": {"grpc": ports["rg"], "metrics": ports["rm"], "ofrep": ports["ro"]},
            "config": {"backoffMaxMs": 300, "drainS": 5, "snapshotIntervalMs": 200},
        },
    }
    secrets = {}
    tls = {}
    if variant == "tls":
        make_certs(tmp_path, ["demo-flagstream-write", "demo-flagstream-read"])
        ca = (tmp_path / "ca.crt").read_text()
        for side in ("write", "read"):
            name = f"demo-flagstream-{side}"
            secrets[f"{side}-tls"] = {"tls.crt": (tmp_path / f"{name}.crt").read_text(), "tls.key": (tmp_path / f"{name}.key").read_text(), "ca.crt": ca}
        values["flagwrite"]["tls"] = {"enabled": True, "secretName": "write-tls"}
        values["flagread"]["tls"] = {"enabled": True, "secretName": "read-tls", "clientCA": {"enabled": True}}
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca.encode(),
            private_key=(tmp_path / "client.key").read_bytes(),
            certificate_chain=(tmp_path / "client.crt").read_bytes(),
        )
    rendered = render(chart, values)
    secret = rendered.one("Secret")
    secrets[secret["metadata"]["name"]] = secret["stringData"]
    services = {s["metadata"]["name"] for s in rendered.all("Service")}
    writer = Container(rendered, "StatefulSet", "flagwrite", tmp_path, secrets, services)
    reader = Container(rendered, "Deployment", "flagread", tmp_path, secrets, services)
    if variant == "tls":
        assert "exec" in reader.spec["readinessProbe"] and "exec" in writer.spec["readinessProbe"]
    try:
        # The replica first, with no writer: alive, but not ready before a first sync.
        reader.start()
        wait_for(lambda: reader.probe("startupProbe"), 15, "the replica's startup probe")
        assert reader.probe("livenessProbe")
        time.sleep(1)
        assert not reader.probe("readinessProbe"), "ready before holding any state"

        writer.start()
        wait_for(lambda: writer.probe("startupProbe"), 30, "the writer's startup probe")
        assert writer.probe("readinessProbe") and writer.probe("livenessProbe")
        wait_for(lambda: reader.probe("readinessProbe"), 15, "the replica to become ready after its first sync")

        # `helm test`: the test pod's containers, run as written, exit 0.
        for index in range(2):
            test = Container(rendered, "Pod", "test", tmp_path, secrets, services, container=index)
            done = subprocess.run(test.argv(test.spec["command"]), capture_output=True, text=True, timeout=30)
            assert done.returncode == 0 and done.stdout.strip() == "SERVING", (test.spec["command"], done.stderr)

        # NOTES.txt, followed as written (the port-forwards are the local ports).
        commands = [line.strip() for line in rendered.notes.splitlines() if line.strip().startswith("grpcurl ")]
        assert len(commands) == 3
        env = os.environ | {"ADMIN": secrets[secret["metadata"]["name"]]["admin-token"], "EVAL": secrets[secret["metadata"]["name"]]["eval-token"]}
        if variant == "tls":
            for f in ("ca.crt", "client.crt", "client.key"):
                assert (tmp_path / f).exists()
        outputs = []
        for line in commands:
            argv = [grpcurl()] + shlex.split(line)[1:]
            argv = [a.replace("$ADMIN", env["ADMIN"]).replace("$EVAL", env["EVAL"]) for a in argv]
            argv = [a.replace("Bearer $ADMIN", "") for a in argv]
            for attempt in range(50):
                done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=20)
                # The evaluation may race the change's arrival at the replica.
                if done.returncode == 0 or "FlagEval" not in line:
                    break
                time.sleep(0.1)
            assert done.returncode == 0, f"{line}\n{done.stderr}"
            outputs.append(done.stdout)
        assert '"variant": "on"' in outputs[2], outputs[2]

        # Metrics the dashboard and alerts use are exported on the rendered ports.
        for c in (writer, reader):
            text = urllib.request.urlopen(f"http://127.0.0.1:{c.ports['metrics']}/metrics", timeout=5).read().decode()
            names = set(re.findall(r"^([a-z_]+)(?:\{| )", text, re.M))
            dashboard = (Path(__file__).parents[1] / "files" / "dashboard.json").read_text()
            used = set(re.findall(rf"\b{c.component}_[a-z_]+", dashboard))
            assert used and used <= names, used - names

        # The README's backup and restore (after the scrape: a restored flag starts new counters).
        if variant == "plaintext":
            backup_and_restore(tmp_path, writer.ports["grpc"], env["ADMIN"])

        # The writer goes away: the replica stays alive and ready, and keeps answering.
        writer.stop()
        assert not writer.probe("livenessProbe")
        time.sleep(1)
        assert reader.probe("livenessProbe"), "liveness failed with the writer down"
        assert reader.probe("readinessProbe"), "a replica holding a state stopped being ready"
        again = subprocess.run([grpcurl()] + [a.replace("$EVAL", env["EVAL"]) for a in shlex.split(commands[2])[1:]],
                               capture_output=True, text=True, cwd=tmp_path, timeout=20)
        assert again.returncode == 0 and '"variant": "on"' in again.stdout, again.stderr

        # A restarted replica (same emptyDir) serves its snapshot file with the writer still down.
        reader.stop()
        reader.start()
        wait_for(lambda: reader.probe("readinessProbe"), 15, "the replica to serve its snapshot file")
        took = reader.stop()
        assert took < reader.grace
    finally:
        reader.kill()
        writer.kill()


def connect(port: int, seconds: float) -> socket.socket:
    """A TCP connection to 127.0.0.1:port, retried while it is refused; the last refusal is raised."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=5)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_replicas_side_by_side_serve_ofrep_on_their_rendered_ports(chart, tmp_path):
    """Two replicas on one host, each rendered with its own ports (as the other tests pick
    them), start side by side and answer HTTP on the OFREP port their manifest names."""
    replicas = []
    try:
        for index in range(2):
            ports = {"grpc": free_port(), "metrics": free_port(), "ofrep": free_port()}
            rendered = render(chart, {"auth": {"devNoAuth": True}, "flagread": {"ports": ports, "config": {"drainS": 5}}})
            services = {s["metadata"]["name"] for s in rendered.all("Service")}
            reader = Container(rendered, "Deployment", "flagread", tmp_path / str(index), {}, services)
            assert reader.ports == ports
            assert reader.env["FLAGREAD_OFREP_LISTEN"] == f"127.0.0.1:{ports['ofrep']}"
            reader.start()
            replicas.append(reader)
        for reader in replicas:
            wait_for(lambda: reader.probe("startupProbe"), 15, "the replica's startup probe")
            assert reader.process.poll() is None, reader.log.read_text()[-2000:]
        for reader in replicas:
            # Any HTTP answer will do: without a writer the replica holds no flags yet.
            connect(reader.ports["ofrep"], 5).close()
            conn = http.client.HTTPConnection("127.0.0.1", reader.ports["ofrep"], timeout=5)
            conn.request("POST", "/ofrep/v1/evaluate/flags/new-checkout", body=b"{}",
                         headers={"content-type": "application/json"})
            assert conn.getresponse().status >= 200
            conn.close()
        for reader in replicas:
            reader.stop()
    finally:
        for reader in replicas:
            reader.kill()


def evaluate(port: int, token: str, cwd: Path, tls_args: list[str]) -> subprocess.CompletedProcess:
    """NOTES.txt's evaluation of new-checkout, against the replica on `port`."""
    return subprocess.run(
        [grpcurl(), *tls_args, "-H", f"authorization: Bearer {token}", "-d",
         '{"namespace": "production", "flag_key": "new-checkout", "context": {"user_id": "alice"}}',
         f"localhost:{port}", "flagstream.v1.FlagEval/Evaluate"], capture_output=True, text=True, cwd=cwd, timeout=20)


@pytest.mark.parametrize("variant", ["plaintext", "tls"])
def test_a_second_tier_follows_the_first(chart, tmp_path, variant):
    """flagread.tier2: the writer, a tier-1 replica and a tier-2 replica, each as
    rendered; tier 2 follows tier 1 (never the writer) with its own token, becomes
    ready and answers with the writer's flag."""
    help_text = subprocess.run([binary("flagread"), "--help"], capture_output=True, text=True, check=True).stdout
    assert "--serve-replication" in help_text, "flagread has no --serve-replication yet: replica chaining has not landed"
    ports = {k: free_port() for k in ("wg", "wm", "rg", "rm", "ro")}
    values = {
        "auth": {"tokens": {"admin": "admin-" + "a" * 20, "sync": "sync-" + "s" * 20, "eval": "eval-" + "e" * 20,
                            "tier2Sync": "tier2-" + "t" * 20}},
        "flagwrite": {"ports": {"grpc": ports["wg"], "metrics": ports["wm"]}, "config": {"shutdownGraceSecs": 5}},
        "flagread": {
            "ports": {"grpc": ports["rg"], "metrics": ports["rm"], "ofrep": ports["ro"]},
            "config": {"backoffMaxMs": 300, "drainS": 5, "snapshotIntervalMs": 200},
            "tier2": {"enabled": True},
        },
    }
    secrets, tls_args = {}, ["-plaintext"]
    if variant == "tls":
        # TLS on every port; tier 1 requires client certificates, so tier 2 presents one.
        make_certs(tmp_path, ["demo-flagstream-write", "demo-flagstream-read"])
        ca = (tmp_path / "ca.crt").read_text()
        pem = lambda name: {"tls.crt": (tmp_path / f"{name}.crt").read_text(), "tls.key": (tmp_path / f"{name}.key").read_text(), "ca.crt": ca}
        secrets = {"write-tls": pem("demo-flagstream-write"), "read-tls": pem("demo-flagstream-read"), "tier2-client": pem("client")}
        values["flagwrite"]["tls"] = {"enabled": True, "secretName": "write-tls"}
        values["flagread"]["tls"] = {"enabled": True, "secretName": "read-tls", "clientCA": {"enabled": True}}
        values["flagread"]["tier2"]["upstreamTLS"] = {"clientCertSecretName": "tier2-client"}
        tls_args = ["-cacert", "ca.crt", "-servername", "demo-flagstream-read", "-cert", "client.crt", "-key", "client.key"]
    rendered = render(chart, values)
    secret = rendered.one("Secret")
    secrets[secret["metadata"]["name"]] = secret["stringData"]
    services = {s["metadata"]["name"] for s in rendered.all("Service")}
    writer = Container(rendered, "StatefulSet", "flagwrite", tmp_path, secrets, services)
    tier1 = Container(rendered, "Deployment", "flagread", tmp_path, secrets, services)
    tier2 = Container(rendered, "Deployment", "flagread-tier2", tmp_path, secrets, services)
    tier2.move_listeners({"grpc": free_port(), "metrics": free_port(), "ofrep": free_port()})
    # As rendered: tier 1 serves Replication, tier 2 follows tier 1's port with its own token.
    assert tier1.env["FLAGREAD_SERVE_REPLICATION"] == "true" and "FLAGREAD_SERVE_REPLICATION" not in tier2.env
    scheme = "https" if variant == "tls" else "http"
    assert tier2.env["FLAGREAD_UPSTREAM"] == f"{scheme}://127.0.0.1:{ports['rg']}"
    assert tier2.env["FLAGREAD_SYNC_TOKEN"] == "tier2-" + "t" * 20 != tier1.env["FLAGREAD_SYNC_TOKEN"]
    try:
        writer.start()
        wait_for(lambda: writer.probe("startupProbe"), 30, "the writer's startup probe")
        tier1.start()
        tier2.start()
        wait_for(lambda: tier1.probe("readinessProbe"), 15, "tier 1 to become ready")
        wait_for(lambda: tier2.probe("readinessProbe"), 15, "tier 2 to become ready after a first sync from tier 1")
        assert tier2.probe("livenessProbe")

        # A flag made through the writer, as NOTES.txt makes it, is answered by tier 2.
        commands = [line.strip() for line in rendered.notes.splitlines() if line.strip().startswith("grpcurl ")]
        admin, token = secrets[secret["metadata"]["name"]]["admin-token"], secrets[secret["metadata"]["name"]]["eval-token"]
        for line in commands[:2]:
            argv = [grpcurl()] + [a.replace("$ADMIN", admin) for a in shlex.split(line)[1:]]
            done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=20)
            assert done.returncode == 0, f"{line}\n{done.stderr}"
        for attempt in range(100):
            done = evaluate(tier2.ports["grpc"], token, tmp_path, tls_args)
            if done.returncode == 0:
                break
            time.sleep(0.1)
        assert done.returncode == 0 and '"variant": "on"' in done.stdout, done.stderr + tier2.log.read_text()[-2000:]

        # `helm test`'s tier-2 container checks tier 2's Service (here: its moved port).
        test = Container(rendered, "Pod", "test", tmp_path, secrets, services, container=2)
        assert test.spec["name"] == "flagread-tier2"
        argv = [a.replace(f"127.0.0.1:{ports['rg']}", f"127.0.0.1:{tier2.ports['grpc']}") for a in test.argv(test.spec["command"])]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and done.stdout.strip() == "SERVING", (argv, done.stderr)

        # Tier 2's token follows tier 1, not the writer: the writer refuses it.
        writer_tls = ["-cacert", "ca.crt", "-servername", "demo-flagstream-write"] if variant == "tls" else ["-plaintext"]
        refused = subprocess.run(
            [grpcurl(), *writer_tls, "-max-time", "5", "-H", f"authorization: Bearer {tier2.env['FLAGREAD_SYNC_TOKEN']}",
             "-d", "{}", f"localhost:{ports['wg']}", "flagstream.v1.Replication/Subscribe"],
            capture_output=True, text=True, cwd=tmp_path, timeout=20)
        assert refused.returncode != 0 and "Unauthenticated" in refused.stderr, refused.stderr

        # The writer goes away: both tiers stay ready and keep answering.
        writer.stop()
        time.sleep(1)
        assert tier1.probe("readinessProbe") and tier2.probe("readinessProbe")
        again = evaluate(tier2.ports["grpc"], token, tmp_path, tls_args)
        assert again.returncode == 0 and '"variant": "on"' in again.stdout, again.stderr
        tier2.stop()
        tier1.stop()
    finally:
        for c in (tier2, tier1, writer):
            c.kill()
