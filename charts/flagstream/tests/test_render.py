"""The chart through the real Helm: strict lint, rendering with every value set,
Kubernetes schemas for every object on every supported version, our own schemas
for the prometheus-operator objects, and template assertions in the style of
helm-unittest."""

import json
import re
import subprocess
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import CHART, CRATE_VERSION, ROOT, VALUE_SETS, binary, pod_specs, render

KUBE_VERSIONS = sorted({"1.27.0", "1.30.0", "1.33.0", kubernetes_validate.utils.latest_version()})
CRD_SCHEMAS = Path(__file__).parent / "crd-schemas"
FIXED_TOKENS = {"auth": {"tokens": {"admin": "a" * 20, "sync": "s" * 20, "eval": "e" * 20}}}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_lint_strict(value_set, kube_version):
    report = helm.lint(CHART, VALUE_SETS[value_set], strict=True, kube_version=f"v{kube_version}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_object_is_valid_kubernetes(chart, value_set, kube_version):
    """Rendered for a cluster of each version, validated against that version's schemas."""
    rendered = render(chart, VALUE_SETS[value_set], kube_version=kube_version)
    assert rendered.objects
    for obj in rendered.objects:
        what = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            schema = json.loads((CRD_SCHEMAS / f"{obj['kind'].lower()}.json").read_text())
            jsonschema.validate(obj, schema)
            continue
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{value_set}: {what} on {kube_version}: {e.message} at {list(e.path)}")


def test_tls_probes_are_native_from_kubernetes_1_37_unless_mtls(chart):
    values = {"flagwrite": {"tls": {"enabled": True, "secretName": "w"}},
              "flagread": {"tls": {"enabled": True, "secretName": "r", "clientCA": {"enabled": True}}}}
    old = render(chart, values, kube_version="1.33.0")
    new = render(chart, values, kube_version="1.37.0")
    assert "exec" in old.container("StatefulSet", "flagwrite")["livenessProbe"]
    assert new.container("StatefulSet", "flagwrite")["livenessProbe"]["grpc"]["mode"] == "TLS"
    # The kubelet never presents a client certificate: mTLS keeps the exec probe.
    assert "exec" in new.container("Deployment", "flagread")["livenessProbe"]


def test_crd_schemas_catch_mistakes(chart):
    rendered = render(chart, VALUE_SETS["monitoring"])
    rule = rendered.one("PrometheusRule")
    rule["spec"]["groups"][0]["rules"][0]["for"] = "five minutes"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rule, json.loads((CRD_SCHEMAS / "prometheusrule.json").read_text()))
    monitor = rendered.all("ServiceMonitor")[0]
    monitor["spec"]["endpoints"][0]["prot"] = "metrics"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, json.loads((CRD_SCHEMAS / "servicemonitor.json").read_text()))


def test_chart_versions_follow_the_crate(chart):
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["appVersion"] == CRATE_VERSION
    assert meta["apiVersion"] == "v2"
    assert meta["kubeVersion"] == ">=1.27.0-0"


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_writer_is_one_statefulset_pod_with_its_volume(chart, value_set):
    values = VALUE_SETS[value_set]
    rendered = render(chart, values)
    sts = rendered.one("StatefulSet", "flagwrite")
    assert sts["spec"]["replicas"] == 1
    assert sts["spec"]["podManagementPolicy"] == "OrderedReady"
    assert sts["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert sts["spec"]["serviceName"] in {s["metadata"]["name"] for s in rendered.all("Service") if s["spec"].get("clusterIP") == "None"}
    mounts = {m["name"]: m["mountPath"] for m in rendered.container("StatefulSet", "flagwrite")["volumeMounts"]}
    assert mounts["data"] == "/data"
    claim = values.get("flagwrite", {}).get("persistence", {}).get("existingClaim")
    if claim:
        volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
        assert volumes["data"]["persistentVolumeClaim"]["claimName"] == claim
        assert "volumeClaimTemplates" not in sts["spec"]
    else:
        (template,) = sts["spec"]["volumeClaimTemplates"]
        assert template["metadata"]["name"] == "data"
        assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]
    assert not [p for p in rendered.all("PodDisruptionBudget") if "flagwrite" in json.dumps(p["spec"]["selector"])]


def test_writer_replicas_cannot_be_set(chart):
    with pytest.raises(helm.HelmValuesError, match="additional properties 'replicaCount' not allowed"):
        chart.validate_schema({"flagwrite": {"replicaCount": 2}})


def test_hpa_on_leaves_replicas_out_and_off_sets_them(chart):
    on = render(chart)
    assert "replicas" not in on.one("Deployment", "flagread")["spec"]
    hpa = on.one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == on.one("Deployment", "flagread")["metadata"]["name"]
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    off = render(chart, {"flagread": {"autoscaling": {"enabled": False}, "replicaCount": 4}})
    assert off.one("Deployment", "flagread")["spec"]["replicas"] == 4
    assert not off.all("HorizontalPodAutoscaler")


def test_image_tag_defaults_to_app_version(chart):
    image = render(chart).container("Deployment", "flagread")["image"]
    assert image == f"localhost/flagstream:{CRATE_VERSION}"
    assert render(chart, {"image": {"tag": "9.9.9"}}).container("StatefulSet", "flagwrite")["image"].endswith(":9.9.9")
    digest = "sha256:" + "0" * 64
    assert render(chart, {"image": {"digest": digest}}).container("Deployment", "flagread")["image"].endswith("@" + digest)


def checksums(rendered) -> set[str]:
    return {
        o["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        for o in rendered.objects
        if o["kind"] in ("Deployment", "StatefulSet")
    }


def test_changing_the_tokens_changes_the_checksum(chart):
    first = checksums(render(chart, FIXED_TOKENS))
    assert len(first) == 1
    assert checksums(render(chart, FIXED_TOKENS)) == first
    other = merge(FIXED_TOKENS, {"auth": {"tokens": {"eval": "x" * 20}}})
    assert checksums(render(chart, other)) != first
    extra = merge(FIXED_TOKENS, {"auth": {"extraFlagreadTokens": [{"name": "web", "scopes": "eval", "secret": "w" * 20}]}})
    assert checksums(render(chart, extra)) != first


def test_generated_tokens_are_the_same_in_the_secret_and_the_checksum(chart):
    rendered = render(chart)
    secret = rendered.one("Secret")["stringData"]
    assert len(secret["admin-token"]) >= 16
    assert f"admin admin {secret['admin-token']}" in secret["flagwrite-tokens"]
    assert f"flagread sync {secret['sync-token']}" in secret["flagwrite-tokens"]
    assert f"eval eval {secret['eval-token']}" in secret["flagread-tokens"]
    assert rendered.one("Secret")["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    # The same tokens given as values give the same checksum: the generated
    # ones were hashed, not a second random draw.
    given = {"auth": {"tokens": {"admin": secret["admin-token"], "sync": secret["sync-token"], "eval": secret["eval-token"]}}}
    assert checksums(render(chart, given)) == checksums(rendered)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"flagread": {"replicaCount": 0}}, "at '/flagread/replicaCount': minimum: got 0, want 1"),
        ({"flagread": {"ports": {"grpc": 70000}}}, "at '/flagread/ports/grpc': maximum: got 70,000, want 65,535"),
        ({"flagwrite": {"ports": {"metrics": 0}}}, "at '/flagwrite/ports/metrics': minimum: got 0, want 1"),
        ({"flagraed": {}}, "additional properties 'flagraed' not allowed"),
        ({"flagread": {"config": {"drainSecs": 5}}}, "at '/flagread/config': additional properties 'drainSecs' not allowed"),
        ({"flagwrite": {"config": {"logFormat": "xml"}}}, "at '/flagwrite/config/logFormat': value must be one of 'text', 'json'"),
        ({"auth": {"tokens": {"admin": "short"}}}, "at '/auth/tokens/admin'"),
        ({"flagread": {"autoscaling": {"minReplicas": "two"}}}, "at '/flagread/autoscaling/minReplicas': got string, want integer"),
        ({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy': value must be one of"),
        ({"flagread": {"ports": {"ofrep": 70000}}}, "at '/flagread/ports/ofrep': maximum: got 70,000, want 65,535"),
        ({"flagread": {"ports": {"ofrep": "8016"}}}, "at '/flagread/ports/ofrep': got string, want integer"),
        ({"flagread": {"config": {"openfeature": {"anonymousNamespaces": "public"}}}},
         "at '/flagread/config/openfeature/anonymousNamespaces': got string, want array"),
        ({"flagread": {"config": {"openfeature": {"anonymousNamespaces": ["Public"]}}}},
         "at '/flagread/config/openfeature/anonymousNamespaces/0': 'Public' does not match pattern"),
        ({"flagread": {"config": {"openfeature": {"defaultNamespace": ""}}}},
         "at '/flagread/config/openfeature/defaultNamespace': '' does not match pattern"),
        ({"flagread": {"config": {"openfeature": {"flagdKeepaliveS": 0}}}},
         "at '/flagread/config/openfeature/flagdKeepaliveS': minimum: got 0, want 1"),
        # An origin is scheme://host[:port]; a comma would split one value in two in the env list.
        ({"flagread": {"config": {"openfeature": {"ofrepCorsOrigins": ["https://app.example.com/"]}}}},
         "at '/flagread/config/openfeature/ofrepCorsOrigins/0'"),
        ({"flagread": {"config": {"openfeature": {"ofrepCorsOrigins": ["https://a.example.com,https://b.example.com"]}}}},
         "at '/flagread/config/openfeature/ofrepCorsOrigins/0'"),
        ({"flagread": {"config": {"openfeature": {"anonymous": ["public"]}}}},
         "at '/flagread/config/openfeature': additional properties 'anonymous' not allowed"),
    ],
)
def test_schema_rejects_bad_values_naming_them(chart, values, message):
    with pytest.raises(helm.HelmValuesError) as error:
        chart.validate_schema(values)
    assert message in str(error.value)


def test_schema_is_strict_for_own_keys_and_open_for_kubernetes_objects():
    schema = json.loads((CHART / "values.schema.json").read_text())
    open_keys = {"resources", "affinity", "behavior", "podSecurityContext", "containerSecurityContext",
                 "podAnnotations", "podLabels", "nodeSelector"}

    def walk(node, path):
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path} is not strict"
            for key, child in node["properties"].items():
                assert child.get("description"), f"{path}.{key} has no description"
                walk(child, f"{path}.{key}")
        elif node.get("type") == "object":
            assert path.rsplit(".", 1)[-1] in open_keys | {"annotations", "labels", "commonLabels", "commonAnnotations"}, path

    walk(schema, "")


RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_pod_meets_the_restricted_pod_security_standard(chart, value_set):
    rendered = render(chart, VALUE_SETS[value_set])
    specs = pod_specs(rendered)
    # Writer, replicas, helm test, and tier 2 when it is on.
    assert len(specs) == 3 + bool(VALUE_SETS[value_set].get("flagread", {}).get("tier2", {}).get("enabled"))
    for name, spec in specs:
        pod_sc = spec.get("securityContext", {})
        assert spec["automountServiceAccountToken"] is False, name
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), name
        for volume in spec.get("volumes", []):
            assert set(volume) - {"name"} <= RESTRICTED_VOLUMES, f"{name}: volume {volume}"
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c.get("securityContext", {})
            where = f"{name}/{c['name']}"
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where
            assert (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))) is True, where
            assert sc.get("runAsUser", pod_sc.get("runAsUser")) == 65532, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert not sc.get("privileged"), where
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            assert seccomp.get("type") in ("RuntimeDefault", "Localhost"), where
            assert not [p for p in c.get("ports", []) if p.get("hostPort")], where


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_probes_point_at_real_ports(chart, value_set):
    rendered = render(chart, VALUE_SETS[value_set])
    for kind, component in (("StatefulSet", "flagwrite"), ("Deployment", "flagread")):
        c = rendered.container(kind, component)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        env = {e["name"]: e.get("value") for e in c["env"]}
        prefix = component.upper()
        assert env[f"{prefix}_LISTEN"] == f"0.0.0.0:{ports['grpc']}"
        assert env[f"{prefix}_METRICS_LISTEN"] == f"0.0.0.0:{ports['metrics']}"
        if component == "flagread":
            assert env["FLAGREAD_OFREP_LISTEN"] == f"0.0.0.0:{ports['ofrep']}"
        tls = VALUE_SETS[value_set].get(component, {}).get("tls", {}).get("enabled", False)
        for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c[probe_name]
            if tls:
                command = probe["exec"]["command"]
                assert command[:2] == [f"/usr/local/bin/{component}", "healthcheck"]
                assert command[command.index("--addr") + 1] == f"127.0.0.1:{ports['grpc']}"
                assert "--tls-ca" in command
            else:
                assert probe["grpc"]["port"] == ports["grpc"]
                assert isinstance(probe["grpc"]["port"], int)
        services = lambda p: p.get("grpc", {}).get("service") if "grpc" in p else p["exec"]["command"][p["exec"]["command"].index("--service") + 1]
        assert services(c["livenessProbe"]) == "flagstream.liveness"
        assert services(c["startupProbe"]) == "flagstream.liveness"
        assert services(c["readinessProbe"]) == ""
        grace = rendered.one(kind, component)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        drain = int(env["FLAGWRITE_SHUTDOWN_GRACE_SECS" if component == "flagwrite" else "FLAGREAD_DRAIN_S"])
        assert grace >= drain + 10
        for svc in rendered.all("Service"):
            if svc["metadata"]["labels"]["app.kubernetes.io/component"] == component:
                for p in svc["spec"]["ports"]:
                    assert p["targetPort"] in ports


def test_replica_startup_has_room_for_a_cold_start(chart):
    c = render(chart).container("Deployment", "flagread")
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_secrets_are_mounted_as_volumes_not_subpaths(chart):
    for value_set in VALUE_SETS.values():
        rendered = render(chart, value_set)
        for _, spec in pod_specs(rendered):
            for c in spec["containers"]:
                for m in c.get("volumeMounts", []):
                    assert "subPath" not in m, m


def test_tls_values_use_exec_probes_and_the_upstream_ca_only(chart):
    rendered = render(chart, VALUE_SETS["tls"])
    reader = rendered.one("Deployment", "flagread")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in reader["containers"][0]["env"]}
    assert env["FLAGREAD_UPSTREAM"].startswith("https://demo-flagstream-write:")
    assert env["FLAGREAD_UPSTREAM_CA"] == "/etc/flagstream/upstream-ca/ca.crt"
    assert env["FLAGREAD_TLS_CLIENT_CA"] == "/etc/flagstream/client-ca/ca.crt"
    volumes = {v["name"]: v for v in reader["volumes"]}
    # Only the CA of the writer's Secret reaches the replicas, never its key.
    assert volumes["upstream-ca"]["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    liveness = reader["containers"][0]["livenessProbe"]["exec"]["command"]
    assert "--tls-cert" in liveness  # mTLS: the probe presents a certificate


def test_a_writer_requiring_client_certificates_gets_them_from_the_replicas(chart):
    mtls = merge(VALUE_SETS["tls"], {
        "flagwrite": {"tls": {"clientCA": {"enabled": True, "secretName": "flagstream-client-ca"}}},
        "flagread": {"upstreamTLS": {"clientCertSecretName": "flagstream-replica-client"}},
    })
    rendered = render(chart, mtls)
    for obj in rendered.objects:
        kubernetes_validate.validate(obj, KUBE_VERSIONS[-1], strict=True)
    writer = rendered.one("StatefulSet", "flagwrite")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in writer["containers"][0]["env"]}
    assert env["FLAGWRITE_TLS_CLIENT_CA"] == "/etc/flagstream/client-ca/ca.crt"
    volumes = {v["name"]: v for v in writer["volumes"]}
    assert volumes["client-ca"]["secret"]["secretName"] == "flagstream-client-ca"
    assert "--tls-cert" in writer["containers"][0]["livenessProbe"]["exec"]["command"]
    reader = rendered.one("Deployment", "flagread")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in reader["containers"][0]["env"]}
    assert env["FLAGREAD_UPSTREAM_CERT"] == "/etc/flagstream/upstream-client/tls.crt"
    assert env["FLAGREAD_UPSTREAM_KEY"] == "/etc/flagstream/upstream-client/tls.key"
    volumes = {v["name"]: v for v in reader["volumes"]}
    assert volumes["upstream-client"]["secret"]["secretName"] == "flagstream-replica-client"


def test_sync_token_comes_from_the_same_secret(chart):
    rendered = render(chart)
    env = {e["name"]: e for e in rendered.container("Deployment", "flagread")["env"]}
    ref = env["FLAGREAD_SYNC_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == rendered.one("Secret")["metadata"]["name"]
    assert ref["key"] in rendered.one("Secret")["stringData"]


def test_spread_constraints_get_the_replicas_selector(chart):
    rendered = render(chart)
    deployment = rendered.one("Deployment", "flagread")
    selector = deployment["spec"]["selector"]["matchLabels"]
    constraints = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in constraints} == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for c in constraints:
        assert c["labelSelector"]["matchLabels"] == selector
    pdb = rendered.one("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1 and pdb["spec"]["selector"]["matchLabels"] == selector


def test_services_and_headless_target(chart):
    rendered = render(chart)
    names = {s["metadata"]["name"]: s for s in rendered.all("Service")}
    assert set(names) == {"demo-flagstream-write", "demo-flagstream-write-headless", "demo-flagstream-read", "demo-flagstream-read-headless"}
    assert names["demo-flagstream-read-headless"]["spec"]["clusterIP"] == "None"
    assert names["demo-flagstream-read-headless"]["spec"]["publishNotReadyAddresses"] is False
    assert "dns:///demo-flagstream-read-headless.flags.svc:50052" in rendered.notes
    assert "round_robin" in rendered.notes


def test_openfeature_values_become_flagread_options(chart):
    env = lambda rendered: {e["name"]: e.get("value") for e in rendered.container("Deployment", "flagread")["env"]}
    defaults = env(render(chart))
    assert defaults["FLAGREAD_OFREP_LISTEN"] == "0.0.0.0:8016"
    assert defaults["FLAGREAD_FLAGD_DEFAULT_NAMESPACE"] == "default"
    assert defaults["FLAGREAD_FLAGD_KEEPALIVE_S"] == "20"
    # Empty lists leave the options out: no anonymous namespace, no CORS headers.
    assert "FLAGREAD_ANONYMOUS_NAMESPACES" not in defaults and "FLAGREAD_OFREP_CORS_ORIGINS" not in defaults
    given = env(render(chart, {"flagread": {"ports": {"ofrep": 18016}, "config": {"openfeature": {
        "defaultNamespace": "production", "anonymousNamespaces": ["public", "docs"], "flagdKeepaliveS": 45,
        "ofrepCorsOrigins": ["https://app.example.com", "http://localhost:3000"]}}}}))
    assert given["FLAGREAD_OFREP_LISTEN"] == "0.0.0.0:18016"
    assert given["FLAGREAD_FLAGD_DEFAULT_NAMESPACE"] == "production"
    assert given["FLAGREAD_ANONYMOUS_NAMESPACES"] == "public,docs"
    assert given["FLAGREAD_FLAGD_KEEPALIVE_S"] == "45"
    assert given["FLAGREAD_OFREP_CORS_ORIGINS"] == "https://app.example.com,http://localhost:3000"
    assert env(render(chart, {"flagread": {"config": {"openfeature": {"ofrepCorsOrigins": ["*"]}}}}))[
        "FLAGREAD_OFREP_CORS_ORIGINS"] == "*"


def test_reader_service_exposes_ofrep_next_to_grpc(chart):
    rendered = render(chart, {"flagread": {"ports": {"ofrep": 18016}}})
    services = {s["metadata"]["name"]: s for s in rendered.all("Service")}
    ports = {p["name"]: p for p in services["demo-flagstream-read"]["spec"]["ports"]}
    assert ports["grpc"]["appProtocol"] == "grpc"
    assert ports["ofrep"] == {"name": "ofrep", "port": 18016, "targetPort": "ofrep", "protocol": "TCP", "appProtocol": "http"}
    container = {p["name"]: p["containerPort"] for p in rendered.container("Deployment", "flagread")["ports"]}
    assert container["ofrep"] == 18016
    # The headless Service is for gRPC clients' round_robin; the writer has no OFREP port.
    assert [p["name"] for p in services["demo-flagstream-read-headless"]["spec"]["ports"]] == ["grpc"]
    for name in ("demo-flagstream-write", "demo-flagstream-write-headless"):
        assert "ofrep" not in {p["name"] for p in services[name]["spec"]["ports"]}


def test_notes_point_openfeature_providers_at_the_replicas(chart):
    notes = render(chart).notes
    assert "FLAGD_HOST=demo-flagstream-read.flags.svc FLAGD_PORT=50052 FLAGD_RESOLVER=rpc" in notes
    assert "http://demo-flagstream-read.flags.svc:8016" in notes
    assert "flagd-selector: flagSetId=<namespace>" in notes
    assert "no namespace is readable without" in notes
    open_notes = render(chart, {"flagread": {"ports": {"ofrep": 18016}, "tls": {"enabled": True, "secretName": "r"},
                                             "config": {"openfeature": {"anonymousNamespaces": ["public"]}}}}).notes
    assert "http://demo-flagstream-read.flags.svc:18016" in open_notes
    assert "FLAGD_TLS=true" in open_notes
    assert "without it only public can be read" in open_notes


def test_recommended_labels_everywhere(chart):
    rendered = render(chart, VALUE_SETS["everything"])
    for o in rendered.objects:
        if o["metadata"]["name"] == "demo-extra":
            continue  # extraObjects are rendered as given
        labels = o["metadata"]["labels"]
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                    "app.kubernetes.io/part-of", "app.kubernetes.io/managed-by", "helm.sh/chart"):
            assert key in labels, f"{o['kind']}/{o['metadata']['name']} lacks {key}"
        assert labels["team"] == "platform"
        assert o["metadata"]["annotations"]["owner"] == "platform@example.com"
        assert o["metadata"]["name"].startswith("flags")


def test_network_policy_lets_only_replicas_and_admins_reach_the_writer(chart):
    rendered = render(chart, VALUE_SETS["networkpolicy"])
    writer = [p for p in rendered.all("NetworkPolicy") if p["metadata"]["name"].endswith("-write")][0]
    grpc_rule, metrics_rule = writer["spec"]["ingress"]
    assert grpc_rule["ports"] == [{"port": 50051, "protocol": "TCP"}]
    assert grpc_rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "flagread"
    test_pod = rendered.one("Pod")["metadata"]["labels"]
    assert all(test_pod[k] == v for k, v in grpc_rule["from"][1]["podSelector"]["matchLabels"].items())
    assert grpc_rule["from"][2]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "flag-admins"}
    assert metrics_rule["ports"] == [{"port": 9091, "protocol": "TCP"}]


def test_network_policy_opens_ofrep_wherever_replicas_serve_grpc(chart):
    values = {**VALUE_SETS["networkpolicy"], "flagread": {"ports": {"grpc": 15052, "metrics": 19092, "ofrep": 18016}}}
    rendered = render(chart, values)
    reader = [p for p in rendered.all("NetworkPolicy") if p["metadata"]["name"].endswith("-read")][0]
    clients_rule, metrics_rule = reader["spec"]["ingress"]
    # Clients of both front ends come from anywhere, as for gRPC; metrics keep their own peers.
    assert "from" not in clients_rule
    assert clients_rule["ports"] == [{"port": 15052, "protocol": "TCP"}, {"port": 18016, "protocol": "TCP"}]
    assert metrics_rule["ports"] == [{"port": 19092, "protocol": "TCP"}]
    assert metrics_rule["from"] == VALUE_SETS["networkpolicy"]["networkPolicy"]["metricsFrom"]
    writer = [p for p in rendered.all("NetworkPolicy") if p["metadata"]["name"].endswith("-write")][0]
    assert 18016 not in [port["port"] for rule in writer["spec"]["ingress"] for port in rule["ports"]]


def test_dashboard_and_rules_only_use_exported_metric_names(chart):
    """The names the binaries register (scraped for real in test_binaries)."""
    exported = set()
    for source in ("flagwrite/src/metrics.rs", "flagread/src/metrics.rs"):
        exported |= set(re.findall(r'"((?:flagwrite|flagread)_[a-z_]+)"', (ROOT / source).read_text()))
    rendered = render(chart, VALUE_SETS["monitoring"])
    dashboard = json.loads(rendered.one("ConfigMap")["data"]["flagstream.json"])
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"\b(?:flagwrite|flagread)_[a-z_]+", target["expr"]))
    for rule in rendered.one("PrometheusRule")["spec"]["groups"][0]["rules"]:
        used |= set(re.findall(r"\b(?:flagwrite|flagread)_[a-z_]+", rule["expr"]))
    # prometheus-client registers a counter without `_total` and adds it when exporting.
    base = {re.sub(r"_(bucket|sum|count|total)$", "", name) for name in used}
    exported = {re.sub(r"_total$", "", name) for name in exported}
    assert base <= exported, base - exported
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("writes/s", "write latency", "head revision", "subscribers", "lag", "staleness", "evaluations/s", "evaluation latency", "shed"):
        assert topic in titles
    assert rendered.one("ConfigMap")["metadata"]["labels"]["grafana_dashboard"] == "1"


# Options the chart sets on purpose only through extraEnv, and why.
NOT_IN_VALUES = {
    # flagread has no client certificate for its upstream, so a writer that
    # requires one would cut its own replicas off.
    "FLAGWRITE_TLS_CLIENT_CA",
}


def test_every_binary_option_is_reachable_through_values():
    templates = "".join(p.read_text() for p in (CHART / "templates").glob("*.yaml"))
    for name in ("flagwrite", "flagread"):
        help_text = subprocess.run([binary(name), "--help"], capture_output=True, text=True, check=True).stdout
        envs = set(re.findall(r"\[env: ([A-Z_]+)=", help_text))
        assert len(envs) > 8
        missing = {e for e in envs if e not in templates} - NOT_IN_VALUES
        assert not missing, f"{name}: no value sets {sorted(missing)}"


def test_extra_objects_env_args_and_volumes(chart):
    rendered = render(chart, VALUE_SETS["everything"])
    extra = [o for o in rendered.objects if o["metadata"]["name"] == "demo-extra"]
    assert extra and extra[0]["data"]["note"] == "made by extraObjects"
    w = rendered.container("StatefulSet", "flagwrite")
    assert w["args"] == ["--heartbeat-ms", "2000"]
    assert {"name": "RUST_LOG", "value": "info"} in w["env"]
    assert {"name": "scratch", "mountPath": "/scratch"} in w["volumeMounts"]


def test_values_table_in_the_chart_readme_is_current():
    import values_table

    expected = values_table.table()
    readme = (CHART / "README.md").read_text()
    start, end = readme.index(values_table.BEGIN), readme.index(values_table.END)
    assert readme[start + len(values_table.BEGIN):end].strip() == expected.strip(), (
        "charts/flagstream/README.md's values table is stale: run "
        ".venv-test/bin/python charts/flagstream/tests/values_table.py --write"
    )


@pytest.mark.parametrize(
    "values",
    [{"auth": {"devNoAuth": True}}, {"flagwrite": {"persistence": {"enabled": False}}}, {"serviceAccount": {"create": False}}],
)
def test_other_value_combinations_render_valid_objects(chart, values):
    rendered = render(chart, values)
    for obj in rendered.objects:
        kubernetes_validate.validate(obj, KUBE_VERSIONS[-1], strict=True)
    if values.get("auth", {}).get("devNoAuth"):
        assert not rendered.all("Secret")
        env = {e["name"]: e.get("value") for e in rendered.container("Deployment", "flagread")["env"]}
        assert env["FLAGREAD_DEV_NO_AUTH"] == "true" and "FLAGREAD_TOKENS_FILE" not in env


@pytest.mark.parametrize(
    "values, message",
    [
        ({"metrics": {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True}}}, "enable one"),
        ({"flagread": {"tls": {"enabled": True}}}, "flagread.tls.enabled needs flagread.tls.secretName"),
        ({"flagwrite": {"tls": {"enabled": True}}}, "flagwrite.tls.enabled needs flagwrite.tls.secretName"),
        ({"flagread": {"ports": {"ofrep": 50052}}}, "flagread.ports must be distinct"),
        ({"flagwrite": {"ports": {"metrics": 50051}}}, "flagwrite.ports must be distinct"),
        ({"flagread": {"tls": {"clientCA": {"enabled": True}}}}, "flagread.tls.clientCA.enabled needs flagread.tls.enabled"),
        ({"flagwrite": {"tls": {"clientCA": {"enabled": True}}}}, "flagwrite.tls.clientCA.enabled needs flagwrite.tls.enabled"),
        (
            {"flagwrite": {"tls": {"enabled": True, "secretName": "w", "clientCA": {"enabled": True}}}},
            "flagwrite.tls.clientCA.enabled needs flagread.upstreamTLS.clientCertSecretName",
        ),
    ],
)
def test_contradictory_values_fail_with_a_message(chart, values, message):
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(chart, values)


TIER2 = merge(FIXED_TOKENS, {"auth": {"tokens": {"tier2Sync": "t" * 20}}, "flagread": {"tier2": {"enabled": True}}})
TIER2_TLS = merge(merge(VALUE_SETS["tls"], TIER2), {"flagread": {"tier2": {"upstreamTLS": {"clientCertSecretName": "tier2-client"}}}})


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_tier2_off_adds_nothing(chart):
    rendered = render(chart, FIXED_TOKENS)
    assert not [o for o in rendered.objects if "tier2" in o["metadata"]["name"]]
    assert "FLAGREAD_SERVE_REPLICATION" not in env_of(rendered.container("Deployment", "flagread"))
    secret = rendered.one("Secret")["stringData"]
    assert "tier2-sync-token" not in secret and " sync " not in secret["flagread-tokens"]
    assert "Tier 2" not in rendered.notes
    # Without tier 2 the tier-1 objects render exactly as before it existed.
    assert checksums(render(chart, merge(FIXED_TOKENS, {"flagread": {"tier2": {"upstream": "http://x:1"}}}))) == checksums(rendered)


def test_tier2_follows_tier1_with_its_own_sync_token(chart):
    rendered = render(chart, TIER2)
    tier1 = env_of(rendered.container("Deployment", "flagread"))
    tier2 = env_of(rendered.container("Deployment", "flagread-tier2"))
    assert tier1["FLAGREAD_SERVE_REPLICATION"] == "true"
    assert tier1["FLAGREAD_MAX_REPLICATION_STREAMS"] == "1024"
    assert (tier1["FLAGREAD_REPLICATION_RETAIN"], tier1["FLAGREAD_REPLICATION_HEARTBEAT_MS"]) == ("4096", "5000")
    assert not {"FLAGREAD_MAX_REPLICATION_STREAMS", "FLAGREAD_REPLICATION_RETAIN"} & set(tier2)
    assert "FLAGREAD_SERVE_REPLICATION" not in tier2
    # Tier 2's upstream is tier 1's Service on its gRPC port, in plain text here.
    service = {s["metadata"]["name"]: s for s in rendered.all("Service")}["demo-flagstream-read"]
    (grpc_port,) = [p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert tier2["FLAGREAD_UPSTREAM"] == f"http://demo-flagstream-read:{grpc_port}"
    assert tier1["FLAGREAD_UPSTREAM"] == "http://demo-flagstream-write:50051"
    # Each tier presents its own secret; tier 2's is a sync line of flagread's
    # tokens file (which tier 1 reads) and of no file the writer reads.
    secret = rendered.one("Secret")
    data = secret["stringData"]
    assert tier1["FLAGREAD_SYNC_TOKEN"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "sync-token"}
    assert tier2["FLAGREAD_SYNC_TOKEN"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "tier2-sync-token"}
    assert data["tier2-sync-token"] == "t" * 20
    assert f"flagread-tier2 sync {'t' * 20}" in data["flagread-tokens"].splitlines()
    assert "t" * 20 not in data["flagwrite-tokens"]
    assert tier1["FLAGREAD_TOKENS_FILE"] == tier2["FLAGREAD_TOKENS_FILE"] == "/etc/flagstream/tokens/flagread-tokens"
    # The tokens file changed, so tier 1 rolls to read it.
    assert checksums(rendered) != checksums(render(chart, FIXED_TOKENS))


def test_generated_tier2_token_is_kept_with_the_others(chart):
    data = render(chart, {"flagread": {"tier2": {"enabled": True}}}).one("Secret")["stringData"]
    token = data["tier2-sync-token"]
    assert len(token) >= 16 and token not in (data["sync-token"], data["eval-token"])
    assert f"flagread-tier2 sync {token}" in data["flagread-tokens"]


def test_tier2_runs_tier1s_container_with_its_own_placement(chart):
    rendered = render(chart, VALUE_SETS["tier2"])
    tier1 = rendered.one("Deployment", "flagread")
    tier2 = rendered.one("Deployment", "flagread-tier2")
    assert tier2["metadata"]["name"] == "demo-flagstream-read-tier2"
    same = lambda c: {k: v for k, v in c.items() if k not in ("env", "resources")}
    assert same(tier1["spec"]["template"]["spec"]["containers"][0]) == same(tier2["spec"]["template"]["spec"]["containers"][0])
    differ = {"FLAGREAD_UPSTREAM", "FLAGREAD_SYNC_TOKEN", "FLAGREAD_SERVE_REPLICATION", "FLAGREAD_MAX_REPLICATION_STREAMS",
              "FLAGREAD_REPLICATION_RETAIN", "FLAGREAD_REPLICATION_HEARTBEAT_MS"}
    env1, env2 = env_of(tier1["spec"]["template"]["spec"]["containers"][0]), env_of(tier2["spec"]["template"]["spec"]["containers"][0])
    assert {k: v for k, v in env1.items() if k not in differ} == {k: v for k, v in env2.items() if k not in differ}
    pod2 = tier2["spec"]["template"]["spec"]
    assert tier2["spec"]["replicas"] == 6 and "replicas" not in tier1["spec"]
    assert pod2["nodeSelector"] == {"topology.kubernetes.io/region": "eu-west-1"}
    assert pod2["tolerations"][0]["value"] == "flags-tier2"
    assert pod2["containers"][0]["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"}}
    # Spread constraints come from tier 1 but select tier 2's pods.
    for c in pod2["topologySpreadConstraints"]:
        assert c["labelSelector"]["matchLabels"] == tier2["spec"]["selector"]["matchLabels"]
    # Tier 1's HPA stays, tier 2 has none (autoscaling off); its PDB has its own budget.
    assert [h["metadata"]["name"] for h in rendered.all("HorizontalPodAutoscaler")] == ["demo-flagstream-read"]
    pdbs = {p["metadata"]["name"]: p["spec"]["maxUnavailable"] for p in rendered.all("PodDisruptionBudget")}
    assert pdbs == {"demo-flagstream-read": 1, "demo-flagstream-read-tier2": 2}
    services = {s["metadata"]["name"]: s for s in rendered.all("Service")}
    assert services["demo-flagstream-read-tier2"]["metadata"]["annotations"] == {"example.com/region": "eu-west-1"}
    assert services["demo-flagstream-read-tier2-headless"]["spec"]["clusterIP"] == "None"


def test_tier2_takes_tier1s_values_where_it_gives_none(chart):
    rendered = render(chart, merge(TIER2, {"flagread": {"nodeSelector": {"pool": "flags"}, "priorityClassName": "high",
                                                        "autoscaling": {"minReplicas": 3}}}))
    pod2 = rendered.one("Deployment", "flagread-tier2")["spec"]["template"]["spec"]
    assert pod2["nodeSelector"] == {"pool": "flags"} and pod2["priorityClassName"] == "high"
    hpas = {h["metadata"]["name"]: h for h in rendered.all("HorizontalPodAutoscaler")}
    assert hpas["demo-flagstream-read-tier2"]["spec"]["minReplicas"] == 3
    assert hpas["demo-flagstream-read-tier2"]["spec"]["scaleTargetRef"]["name"] == "demo-flagstream-read-tier2"
    assert "replicaCount is left out while autoscaling is on" not in rendered.notes
    # Tier 2's autoscaling keys replace tier 1's one by one.
    rendered = render(chart, merge(TIER2, {"flagread": {"tier2": {"replicaCount": 6, "autoscaling": {"maxReplicas": 40}}}}))
    hpas = {h["metadata"]["name"]: h["spec"] for h in rendered.all("HorizontalPodAutoscaler")}
    assert (hpas["demo-flagstream-read-tier2"]["minReplicas"], hpas["demo-flagstream-read-tier2"]["maxReplicas"]) == (2, 40)
    assert hpas["demo-flagstream-read"]["maxReplicas"] == 10
    assert "replicaCount is left out while autoscaling is on" in rendered.notes


@pytest.mark.parametrize("value_set", ["default", "tier2", "tier2-tls"])
def test_tier_selectors_are_disjoint(chart, value_set):
    """Every selector of the chart picks the pods of exactly one workload, and the
    Services, PDB, monitors and NetworkPolicy of a tier pick only that tier."""
    values = {"default": TIER2, "tier2": VALUE_SETS["tier2"], "tier2-tls": merge(TIER2_TLS, {"networkPolicy": {"enabled": True}})}[value_set]
    rendered = render(chart, values)
    pods = {o["metadata"]["labels"]["app.kubernetes.io/component"]: o["spec"]["template"]["metadata"]["labels"]
            for o in rendered.objects if o["kind"] in ("Deployment", "StatefulSet")}
    assert set(pods) == {"flagwrite", "flagread", "flagread-tier2"}
    selectors = []
    for o in rendered.objects:
        component = o["metadata"]["labels"].get("app.kubernetes.io/component")
        if o["kind"] == "Service":
            selectors.append((o, component, o["spec"]["selector"]))
        elif o["kind"] in ("PodDisruptionBudget", "Deployment", "StatefulSet", "ServiceMonitor", "PodMonitor"):
            selectors.append((o, component, o["spec"]["selector"]["matchLabels"]))
        elif o["kind"] == "NetworkPolicy":
            selectors.append((o, component, o["spec"]["podSelector"]["matchLabels"]))
    assert len([s for s in selectors if s[1] == "flagread-tier2"]) >= 4
    for obj, component, selector in selectors:
        picked = {c for c, labels in pods.items() if selects(selector, labels)}
        assert picked == {component}, f"{obj['kind']}/{obj['metadata']['name']} selects {picked}"


def test_tier2_follows_tier1_over_tls_with_tier1s_ca_and_its_client_certificate(chart):
    rendered = render(chart, TIER2_TLS)
    for obj in rendered.objects:
        kubernetes_validate.validate(obj, KUBE_VERSIONS[-1], strict=True)
    pod2 = rendered.one("Deployment", "flagread-tier2")["spec"]["template"]["spec"]
    env = env_of(pod2["containers"][0])
    assert env["FLAGREAD_UPSTREAM"] == "https://demo-flagstream-read:50052"
    assert env["FLAGREAD_UPSTREAM_DOMAIN"] == "demo-flagstream-read"
    assert env["FLAGREAD_UPSTREAM_CA"] == "/etc/flagstream/upstream-ca/ca.crt"
    assert env["FLAGREAD_UPSTREAM_CERT"] == "/etc/flagstream/upstream-client/tls.crt"
    volumes = {v["name"]: v["secret"] for v in pod2["volumes"] if "secret" in v}
    # Only the CA of tier 1's Secret, never its key; tier 2 serves with tier 1's certificate.
    assert volumes["upstream-ca"] == {"secretName": "flagstream-read-tls", "defaultMode": 0o440, "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    assert volumes["upstream-client"]["secretName"] == "tier2-client"
    assert volumes["tls"]["secretName"] == "flagstream-read-tls"
    assert "demo-flagstream-read" in pod2["containers"][0]["readinessProbe"]["exec"]["command"]
    # helm test checks tier 2's Service with the name its certificate holds.
    test = {c["name"]: c["command"] for c in rendered.one("Pod")["spec"]["containers"]}
    assert test["flagread-tier2"][3] == "demo-flagstream-read-tier2:50052"
    assert test["flagread-tier2"][test["flagread-tier2"].index("--tls-domain") + 1] == "demo-flagstream-read"
    # Its own certificate: the probes and helm test expect tier 2's Service name.
    own = render(chart, merge(TIER2_TLS, {"flagread": {"tier2": {"tls": {"secretName": "tier2-tls"}}}}))
    pod2 = own.one("Deployment", "flagread-tier2")["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod2["volumes"]}["tls"]["secret"]["secretName"] == "tier2-tls"
    assert "demo-flagstream-read-tier2" in pod2["containers"][0]["readinessProbe"]["exec"]["command"]


def test_tier2_upstream_can_be_another_address(chart):
    rendered = render(chart, merge(TIER2, {"flagread": {"tier2": {
        "upstream": "https://flags-eu.example.com:443", "upstreamTLS": {"caSecretName": "eu-ca", "caKey": "root.pem"}}}}))
    pod2 = rendered.one("Deployment", "flagread-tier2")["spec"]["template"]["spec"]
    env = env_of(pod2["containers"][0])
    assert env["FLAGREAD_UPSTREAM"] == "https://flags-eu.example.com:443"
    assert env["FLAGREAD_UPSTREAM_CA"] == "/etc/flagstream/upstream-ca/root.pem"
    assert "FLAGREAD_UPSTREAM_DOMAIN" not in env
    assert {v["name"]: v for v in pod2["volumes"]}["upstream-ca"]["secret"]["secretName"] == "eu-ca"
    assert "https://flags-eu.example.com:443" in rendered.notes


def test_network_policy_lets_tier2_reach_tier1_and_not_the_writer(chart):
    rendered = render(chart, VALUE_SETS["tier2"])
    policies = {p["metadata"]["name"]: p["spec"] for p in rendered.all("NetworkPolicy")}
    assert set(policies) == {"demo-flagstream-write", "demo-flagstream-read", "demo-flagstream-read-tier2"}
    tier2_pod = rendered.one("Deployment", "flagread-tier2")["spec"]["template"]["metadata"]["labels"]
    # The writer's gRPC peers: no selector of them picks a tier-2 pod.
    for rule in policies["demo-flagstream-write"]["ingress"]:
        for peer in rule.get("from", []):
            assert "podSelector" not in peer or not selects(peer["podSelector"]["matchLabels"], tier2_pod), peer
    # Tier 1 admits tier 2 on its gRPC port, by a rule of its own.
    clients, from_tier2, metrics = policies["demo-flagstream-read"]["ingress"]
    assert from_tier2["ports"] == [{"port": 50052, "protocol": "TCP"}]
    (peer,) = from_tier2["from"]
    assert selects(peer["podSelector"]["matchLabels"], tier2_pod)
    assert not selects(peer["podSelector"]["matchLabels"], rendered.one("Deployment", "flagread")["spec"]["template"]["metadata"]["labels"])
    # Tier 2 admits clients as tier 1 does.
    assert policies["demo-flagstream-read-tier2"]["ingress"] == [clients, metrics]
    assert policies["demo-flagstream-read-tier2"]["policyTypes"] == ["Ingress"]


def test_tier2_is_monitored_and_alerted_on_like_tier1(chart):
    rendered = render(chart, VALUE_SETS["tier2"])
    monitors = {m["metadata"]["name"] for m in rendered.all("ServiceMonitor")}
    assert "demo-flagstream-read-tier2" in monitors
    rule = rendered.one("PrometheusRule")["spec"]["groups"][0]["rules"]
    (lag,) = [r for r in rule if r["alert"] == "FlagstreamReplicaLagging"]
    pattern = re.search(r'pod=~"([^"]+)"', lag["expr"]).group(1)
    assert re.fullmatch(pattern, "demo-flagstream-read-tier2-5d9c7b8f4-x7k2p")
    assert re.fullmatch(pattern, "demo-flagstream-read-5d9c7b8f4-x7k2p")
    assert not re.fullmatch(pattern, "demo-flagstream-write-0")


def test_tier2_names_fit_with_the_longest_prefix(chart):
    rendered = render(chart, merge(TIER2, {"fullnameOverride": "f" * 46}))
    names = [o["metadata"]["name"] for o in rendered.objects]
    assert any(n.endswith("-read-tier2-headless") for n in names)
    assert all(len(n) <= 63 for n in names), [n for n in names if len(n) > 63]
    for obj in rendered.objects:
        kubernetes_validate.validate(obj, KUBE_VERSIONS[-1], strict=True)
    rule = render(chart, merge(VALUE_SETS["tier2"], {"fullnameOverride": "f" * 46})).one("PrometheusRule")
    pattern = re.search(r'pod=~"([^"]+)"', rule["spec"]["groups"][0]["rules"][1]["expr"]).group(1)
    assert re.fullmatch(pattern, "f" * 43 + "-read-tier2-5d9c7b8f4-x7k2p")


def test_notes_name_tier2(chart):
    notes = render(chart, TIER2).notes
    assert "Tier 2 (demo-flagstream-read-tier2) follows the replicas (demo-flagstream-read)" in notes
    assert "rollout status deployment/demo-flagstream-read-tier2" in notes
    assert "dns:///demo-flagstream-read-tier2-headless.flags.svc:50052" in notes


@pytest.mark.parametrize(
    "values, message",
    [
        (merge(VALUE_SETS["tls"], TIER2), "set flagread.tier2.upstreamTLS.clientCertSecretName"),
        (merge(TIER2, {"auth": {"tokens": {"tier2Sync": "s" * 20}}}), "auth.tokens.tier2Sync must differ from auth.tokens.sync"),
        (merge(TIER2, {"auth": {"tokens": {"tier2Sync": "e" * 20}}}), "auth.tokens.tier2Sync must differ"),
        (merge(TIER2, {"flagread": {"tier2": {"tls": {"secretName": "x"}}}}), "flagread.tier2.tls.secretName needs flagread.tls.enabled"),
        (merge(TIER2, {"flagread": {"tier2": {"upstream": "https://eu.example.com:443"}}}),
         "set flagread.tier2.upstreamTLS.caSecretName"),
    ],
)
def test_contradictory_tier2_values_fail_with_a_message(chart, values, message):
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(chart, values)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"flagread": {"tier2": {"enabled": True, "replicas": 6}}}, "at '/flagread/tier2': additional properties 'replicas' not allowed"),
        ({"flagread": {"tier2": {"replicaCount": -1}}}, "at '/flagread/tier2/replicaCount': minimum: got -1, want 0"),
        ({"flagread": {"tier2": {"upstream": "flags-eu:50052"}}}, "at '/flagread/tier2/upstream'"),
        ({"flagread": {"tier2": {"autoscaling": {"enable": False}}}}, "at '/flagread/tier2/autoscaling': additional properties 'enable' not allowed"),
        ({"auth": {"tokens": {"tier2Sync": "short"}}}, "at '/auth/tokens/tier2Sync'"),
    ],
)
def test_schema_rejects_bad_tier2_values_naming_them(chart, values, message):
    with pytest.raises(helm.HelmValuesError) as error:
        chart.validate_schema(values)
    assert message in str(error.value)


def test_tier2_with_an_existing_secret_or_without_auth(chart):
    rendered = render(chart, merge(VALUE_SETS["existing-secret"], {"flagread": {"tier2": {"enabled": True}}}))
    assert not rendered.all("Secret")
    ref = env_of(rendered.container("Deployment", "flagread-tier2"))["FLAGREAD_SYNC_TOKEN"]["secretKeyRef"]
    assert ref == {"name": VALUE_SETS["existing-secret"]["auth"]["existingSecret"], "key": "tier2-sync-token"}
    rendered = render(chart, {"auth": {"devNoAuth": True}, "flagread": {"tier2": {"enabled": True}}})
    for obj in rendered.objects:
        kubernetes_validate.validate(obj, KUBE_VERSIONS[-1], strict=True)
    env = env_of(rendered.container("Deployment", "flagread-tier2"))
    assert env["FLAGREAD_DEV_NO_AUTH"] == "true" and "FLAGREAD_SYNC_TOKEN" not in env
    assert env_of(rendered.container("Deployment", "flagread"))["FLAGREAD_SERVE_REPLICATION"] == "true"
