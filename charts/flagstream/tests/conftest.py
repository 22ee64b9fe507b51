"""Shared helpers of the chart and image tests: rendering the chart with the real
Helm (helm-python-sdk embeds Helm v4), the value sets the tests go through, and
where the binaries and tools are."""

import json
import os
import shutil
import socket
import tomllib
from pathlib import Path

import helm_python as helm
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "charts" / "flagstream"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
# Every test that renders goes through these: the defaults and each ci file.
VALUE_SETS = {"default": {}} | {
    p.name.removesuffix("-values.yaml"): yaml.safe_load(p.read_text()) for p in CI_VALUES
}
CRATE_VERSION = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"]
IN_CI = bool(os.environ.get("CI"))


def missing(what: str):
    """A tool a test needs is absent: fail in CI, otherwise skip with a notice."""
    if IN_CI:
        pytest.fail(f"{what} is required in CI")
    pytest.skip(f"{what} not available")


@pytest.fixture(scope="session")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


class Rendered:
    """One render of the chart: the objects, by kind and name, and NOTES.txt."""

    def __init__(self, manifests: dict[str, str]):
        self.objects: list[dict] = []
        self.notes = ""
        for path, text in sorted(manifests.items()):
            if path.endswith("NOTES.txt"):
                self.notes = text
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    self.objects.append(doc)

    def all(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, component: str | None = None) -> dict:
        found = [
            o
            for o in self.all(kind)
            if component is None
            or o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
        ]
        assert len(found) == 1, f"expected one {kind} {component or ''}, found {len(found)}"
        return found[0]

    def container(self, kind: str, component: str) -> dict:
        return self.one(kind, component)["spec"]["template"]["spec"]["containers"][0]


def render(chart, values: dict | None = None, name: str = "demo", namespace: str = "flags",
           kube_version: str | None = None) -> Rendered:
    """`helm template`; with kube_version, as for a cluster of that version
    (.Capabilities.KubeVersion), an option helm-python-sdk 0.2.2 passes to Helm
    but does not expose on Chart.render."""
    if kube_version is None:
        return Rendered(chart.render(values or {}, name=name, namespace=namespace))
    from helm_python import _native

    opts = {"name": name, "namespace": namespace, "kube_version": f"v{kube_version}"}
    text = _native.call_string("helm_render", chart._raw(), json.dumps(values or {}), json.dumps(opts))
    return Rendered(json.loads(text))


def pod_specs(rendered: Rendered) -> list[tuple[str, dict]]:
    """(object name, pod spec) of every pod the render would make."""
    specs = []
    for o in rendered.objects:
        if o["kind"] in ("Deployment", "StatefulSet"):
            specs.append((o["metadata"]["name"], o["spec"]["template"]["spec"]))
        elif o["kind"] == "Pod":
            specs.append((o["metadata"]["name"], o["spec"]))
    return specs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary(name: str) -> Path:
    """The binary to drive: FLAGSTREAM_BIN_DIR, else target/release, else target/debug."""
    dirs = [os.environ.get("FLAGSTREAM_BIN_DIR"), ROOT / "target" / "release", ROOT / "target" / "debug"]
    for d in dirs:
        if d and (Path(d) / name).is_file():
            return Path(d) / name
    missing(f"the {name} binary (cargo build -p {name})")


def grpcurl() -> str:
    venv = ROOT / ".venv-test" / "bin" / "grpcurl"
    path = os.environ.get("FLAGSTREAM_GRPCURL") or (str(venv) if venv.is_file() else shutil.which("grpcurl"))
    if not path:
        missing("grpcurl")
    return path
