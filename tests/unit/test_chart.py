"""The Helm chart `charts/dify-mirror`, rendered by Helm itself.

`helm-python-sdk` binds Helm's Go SDK, so this is Helm's own template engine, schema check
and lint, with no helm binary and no cluster. Each value set is rendered once (module
fixture) and every object is validated against the Kubernetes schemas of the oldest and
newest supported versions (`kubernetes-validate`'s strict schemas: an unknown field is an
error), custom resources against their published CRD schemas (`chart_schemas/`) or the
chart's own CRDs. The settings test takes the operator's container env as Kubernetes
would resolve it, builds the real `OperatorSettings` from it and checks the gateway
options and Serve config the operator would apply.
"""

from __future__ import annotations

import base64
import functools
import gzip
import json
import os
import re
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import pytest
import yaml
from helm_python import _native
from referencing import Registry, Resource

from dify_operator.reconcile import serve_options
from dify_operator.settings import OperatorSettings
from dify_serving.manifests import DesiredState
from dify_serving.options import GatewayOptions
from dify_serving.render import render_serve_config
from dify_serving.security.secrets import Secrets
from dify_serving.settings import Settings
from dify_serving.specs import DifyIndex, DifyModel

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "dify-mirror"
SCHEMAS = Path(__file__).parent / "chart_schemas"
RELEASE, NAMESPACE = "dify-mirror", "ai"
#: The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest
#: kubernetes-validate knows.
KUBE_VERSIONS = ("1.29.0", "1.37.0")
KUBERAY = ["ray.io/v1", "ray.io/v1/RayCluster"]
PROMETHEUS = [
    "monitoring.coreos.com/v1",
    "monitoring.coreos.com/v1/ServiceMonitor",
    "monitoring.coreos.com/v1/PrometheusRule",
]
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 10x faster
EXTERNAL_DB = "postgresql://app:S3cretDbPassw0rd@db.example.internal:5432/dify"
EXTERNAL_REDIS = "rediss://:S3cretRedisPassw0rd@redis.example.internal:6380/0"
EXTERNAL_BROKER = "amqp://app:S3cretAmqpPassw0rd@mq.example.internal:5672//"

#: Every gateway value (its path under `gateway`), a value other than its default, and
#: where the operator's gateway options carry it (`GatewayOptions` attribute path).
GATEWAY_SETTINGS: list[tuple[str, Any, str, Any]] = [
    ("replicas", 3, "replicas", 3),
    ("modules", ["models", "inference"], "modules", ["models", "inference"]),
    ("defaultModel", "demo-llm", "default_model", "demo-llm"),
    ("requestTimeoutS", 42.5, "request_timeout_s", 42.5),
    ("metricsEnabled", False, "metrics_enabled", False),
    ("metricsPublic", True, "security.metrics_public", True),
    ("auth", False, "security.enabled", False),
    ("trustedProxies", ["10.244.0.0/16", "fd00::/64"], "security.trusted_proxies", None),
    ("ipAllowlist", ["192.0.2.0/24"], "security.ip_allowlist", None),
    ("routeLimits", {"/v1/inference": 50, "/v1/data/search": 200.5}, "security.route_limits", None),
    ("rateLimitFailOpen", True, "security.fail_open", True),
    ("allowPerReplicaLimits", True, "security.allow_per_replica_limits", True),
    ("requireTotpForAdmin", False, "security.require_totp_for_admin", False),
    ("limits.maxBodyBytes", 33554432, "limits.max_body_bytes", 33554432),
    ("limits.maxDocumentBytes", 2097152, "limits.max_document_bytes", 2097152),
    ("limits.maxDocuments", 50, "limits.max_documents", 50),
    ("limits.streamIdleTimeoutS", 30, "limits.stream_idle_timeout_s", 30.0),
    ("limits.maxBatchRequests", 8, "limits.max_batch_requests", 8),
    ("cache.ttlS", 0, "cache.ttl_s", 0.0),
    ("cache.maxBytes", 1048576, "cache.max_bytes", 1048576),
    ("tasks.broker", "amqp", "tasks.broker", "amqp"),
    ("tasks.ttlS", 3600, "tasks.ttl_s", 3600.0),
    ("tasks.maxAttempts", 5, "tasks.max_attempts", 5),
    ("tasks.leaseS", 12.5, "tasks.lease_s", 12.5),
    ("tasks.consumers", 2, "tasks.consumers", 2),
    ("tasks.concurrency", 16, "tasks.concurrency", 16),
    ("tasks.maxPendingPerKey", 99, "tasks.max_pending_per_key", 99),
    ("tasks.webhookAllowPrivate", True, "tasks.webhook_allow_private", True),
    ("sources.hubDownloads", True, "sources.hub_downloads", True),
    ("sources.roots", ["/models", "/mnt/weights"], "sources.roots", None),
    ("audit.recordText", True, "security.record_text", True),
    ("audit.retentionDays", 30, "security.retention_days", 30),
    ("audit.allowShortRetention", True, "security.allow_short_retention", True),
    ("audit.checkpointS", 15, "security.audit_checkpoint_s", 15.0),
    ("audit.checkpointConfigMap", True, "security.audit_configmap", "dify-mirror-audit-checkpoint"),
]
#: Keys under `gateway` that configure Kubernetes objects, not the gateway's options.
GATEWAY_OBJECT_KEYS = ("service.", "extraEnv")


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


VALUE_SETS: dict[str, tuple[dict[str, Any], list[str]]] = {
    # a plain cluster: no KubeRay, no Prometheus operator
    "defaults": ({}, []),
    # the defaults where KubeRay and the Prometheus operator are installed
    "kuberay": ({}, KUBERAY + PROMETHEUS),
    "gpu": (
        {"ray": {"workerGroups": {"gpu": {"enabled": True}}}},
        KUBERAY,
    ),
    "gpu-plain": (
        {"ray": {"mode": "plain", "workerGroups": {"gpu": {"enabled": True, "gpus": 2}}}},
        [],
    ),
    # KubeRay installed, but not wanted
    "kuberay-off": ({"ray": {"mode": "plain"}}, KUBERAY),
    "external": (
        {
            "postgresql": {"mode": "external", "external": {"url": EXTERNAL_DB}},
            "redis": {
                "mode": "external",
                "external": {"existingSecret": "my-redis", "existingSecretKey": "uri"},
            },
            "rabbitmq": {"mode": "external", "external": {"url": EXTERNAL_BROKER}},
            "qdrant": {"mode": "external", "external": {"url": "https://qdrant.example:6333"}},
            "secrets": {"existingSecret": "my-dify-secrets"},
            "ray": {"auth": {"existingSecret": "my-ray-token"}},
        },
        KUBERAY,
    ),
    "tls": (
        {
            "ingress": {
                "enabled": True,
                "className": "nginx",
                "hosts": ["api.dify.example"],
                "tls": {"enabled": True, "secretName": "dify-tls"},
                "grpc": {"hosts": ["grpc.dify.example"]},
            },
            "gateway": {"trustedProxies": ["10.244.0.0/16"]},
        },
        KUBERAY + PROMETHEUS,
    ),
    "networkpolicy": (
        {"networkPolicy": {"enabled": True}, "rabbitmq": {"mode": "bundled"}},
        KUBERAY,
    ),
    "clusterwide": ({"operator": {"clusterWide": True}}, KUBERAY),
    # every gateway setting away from its default (the settings test)
    "settings": (
        {
            "gateway": _nested({path: value for path, value, _, _ in GATEWAY_SETTINGS}),
            "rabbitmq": {"mode": "bundled"},
        },
        KUBERAY,
    ),
    # everything off that can be off
    "minimal": (
        {
            "operator": {
                "replicas": 1,
                "peering": {"enabled": False},
                "podDisruptionBudget": {"enabled": False},
                "serviceAccount": {"create": False, "name": "my-operator"},
            },
            "gateway": {"replicas": 1, "audit": {"checkpointConfigMap": False}},
            "ray": {
                "autoscaler": {"enabled": False},
                "serviceAccount": {"create": False, "name": "my-ray"},
                "workerGroups": {"cpu": {"enabled": False}},
            },
            "postgresql": {"mode": "none"},
            "redis": {"mode": "none"},
            "qdrant": {"mode": "none"},
            "metrics": {
                "serviceMonitor": {"enabled": False},
                "prometheusRule": {"enabled": False},
                "grafanaDashboard": {"enabled": False},
            },
            "secrets": {"keepOnUninstall": False},
            "tests": {"enabled": False},
        },
        KUBERAY + PROMETHEUS,
    ),
    "kind": (yaml.safe_load((CHART / "ci" / "kind-values.yaml").read_text()), KUBERAY),
}


def render(
    values: dict[str, Any] | None,
    api_versions: Sequence[str] = (),
    kube_version: str = KUBE_VERSIONS[-1],
) -> dict[str, str]:
    """Helm's `template`: template name → text.

    `Chart.render` has no API-versions option, but the library's `helm_render` takes
    `api_versions` and `kube_version` (`helm template --api-versions/--kube-version`);
    the kuberay test proves that they arrive (a RayCluster only with ray.io/v1).
    """
    with helm.Chart.load(CHART) as chart:
        options = {
            "name": RELEASE,
            "namespace": NAMESPACE,
            "api_versions": list(api_versions),
            "kube_version": f"v{kube_version}",
        }
        raw = _native.call_string(
            "helm_render",
            chart._raw(),
            None if values is None else json.dumps(values),
            json.dumps(options),
        )
    manifests: dict[str, str] = json.loads(raw)
    return manifests


class Rendered:
    """One value set's output: the objects, by kind and name, and NOTES.txt."""

    def __init__(self, manifests: dict[str, str]) -> None:
        self.notes = next((t for n, t in manifests.items() if n.endswith("NOTES.txt")), "")
        self.objects = [
            doc
            for name, text in sorted(manifests.items())
            if not name.endswith("NOTES.txt")
            for doc in yaml.load_all(text, Loader=LOADER)
            if doc
        ]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
        return found[0]

    def secrets(self) -> dict[str, dict[str, str]]:
        """Secret name → decoded data."""
        out = {}
        for secret in self.all("Secret"):
            data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
            out[secret["metadata"]["name"]] = data | (secret.get("stringData") or {})
        return out

    def pod_specs(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(where, pod spec) of every workload, RayCluster group and Pod."""
        for obj in self.objects:
            where = f"{obj['kind']}/{obj['metadata']['name']}"
            spec = obj.get("spec") or {}
            if obj["kind"] == "Pod":
                yield where, spec
            elif obj["kind"] in ("Deployment", "StatefulSet"):
                yield where, spec["template"]["spec"]
            elif obj["kind"] == "RayCluster":
                yield f"{where}/head", spec["headGroupSpec"]["template"]["spec"]
                for group in spec.get("workerGroupSpecs", []):
                    yield f"{where}/{group['groupName']}", group["template"]["spec"]

    def container(self, kind: str, name: str) -> dict[str, Any]:
        """The first container of a workload's pods."""
        container: dict[str, Any] = self.one(kind, name)["spec"]["template"]["spec"]["containers"][
            0
        ]
        return container


@pytest.fixture(scope="module")
def rendered() -> dict[str, Rendered]:
    """Every value set, rendered once."""
    return {name: Rendered(render(values, apis)) for name, (values, apis) in VALUE_SETS.items()}


# --- what the chart copies ----------------------------------------------------------------
def test_chart_crds_are_the_repository_crds() -> None:
    for crd in sorted((ROOT / "crds").glob("*.yaml")):
        copy = CHART / "crds" / crd.name
        assert copy.is_file(), f"{copy} is missing: run `make sync-crds`"
        assert copy.read_bytes() == crd.read_bytes(), f"{copy} differs: run `make sync-crds`"
    ours = {p.name for p in (ROOT / "crds").glob("*.yaml")}
    extra = {p.name for p in (CHART / "crds").iterdir()} - ours
    assert extra == {"kopf-peerings.yaml"}, f"files in the chart's crds/ from nowhere: {extra}"


def test_chart_observability_files_are_the_repository_files() -> None:
    for source, copy in (
        ("observability/prometheus/alerts.yaml", "files/alerts.yaml"),
        ("observability/grafana/dify-mirror.json", "files/dify-mirror.json"),
    ):
        assert (CHART / copy).read_bytes() == (ROOT / source).read_bytes(), (
            f"{copy} differs from {source}: run `make sync-crds`"
        )


def test_kopf_peering_crds_are_what_kopf_reads() -> None:
    """The group, version, plural and scope kopf's peering watches (kopf.dev/v1)."""
    import kopf._cogs.structs.references as refs

    crds = {c["spec"]["names"]["kind"]: c for c in _crd_files()["kopf-peerings.yaml"]}
    for kind, selector, scope in (
        ("KopfPeering", refs.NAMESPACED_PEERINGS_K, "Namespaced"),
        ("ClusterKopfPeering", refs.CLUSTER_PEERINGS_K, "Cluster"),
    ):
        spec = crds[kind]["spec"]
        names = (spec["group"], spec["versions"][0]["name"], spec["names"]["plural"])
        assert names == (selector.group, selector.version, selector.any_name)
        assert spec["scope"] == scope


# --- Helm's own checks ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["defaults", "kind", "minimal", "tls"])
def test_helm_lint_is_clean(name: str) -> None:
    values, _ = VALUE_SETS[name]
    for version in KUBE_VERSIONS:
        report = helm.lint(CHART, values, strict=True, kube_version=f"v{version}")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not report["errors"] and not problems, report


@pytest.mark.parametrize(
    "values",
    [
        {"gateway": {"replcas": 3}},
        {"operator": {"image": {"tag": "1", "pullpolicy": "Always"}}},
        {"ray": {"workerGroups": {"gpu": {"enabled": True, "gpu": 1}}}},
        {"ray": {"mode": "kube-ray"}},
        {"redis": {"mode": "external", "external": {"uri": "redis://x"}}},
        {"metrics": {"serviceMonitor": {"enabled": "yes"}}},
        {"gateway": {"routeLimits": {"/v1/inference": 0}}},
        {"secrets": {"bootstrapKey": "not-a-key"}},
        {"ingres": {"enabled": True}},
    ],
)
def test_the_schema_rejects_typos_and_bad_values(values: dict[str, Any]) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmError):  # install and template check it too
        render(values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"redis": {"mode": "none"}}, "gateway.replicas > 1 needs Redis"),
        (
            {"rabbitmq": {"mode": "none"}, "gateway": {"tasks": {"broker": "amqp"}}},
            "broker is amqp but rabbitmq.mode is none",
        ),
        ({"postgresql": {"mode": "external"}}, "postgresql.external.url"),
        ({"ingress": {"enabled": True, "tls": {"enabled": True}}}, "ingress.tls.secretName"),
        ({"operator": {"peering": {"enabled": False}}}, "operator.replicas > 1"),
        (
            {"ray": {"workerGroups": {"gpu": {"enabled": True, "replicas": 5}}}},
            "ray.workerGroups.gpu: minReplicas <= replicas <= maxReplicas",
        ),
    ],
)
def test_contradictory_values_stop_the_render_with_one_line(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render(values)


def test_chart_kube_version_is_the_oldest_validated() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == f">={KUBE_VERSIONS[0]}-0"


def test_every_key_of_values_yaml_is_documented() -> None:
    """helm-docs style: a `# --` comment above every key that holds a value, or above a
    map that holds it (a Kubernetes object such as `resources` is documented whole)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    ancestors: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    undocumented = []
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z0-9_./-]+):(.*)$", line)
        if not match:
            continue
        indent, rest = len(match.group(1)), match.group(3).strip()
        ancestors = [a for a in ancestors if a[0] < indent]
        comments = []
        for above in reversed(lines[:i]):
            if not above.strip().startswith("#"):
                break
            comments.append(above.strip())
        documented = any(c.startswith("# --") for c in comments)
        child = next((n for n in lines[i + 1 :] if n.strip() and not n.strip().startswith("#")), "")
        is_parent = not rest and len(child) - len(child.lstrip()) > indent
        if not is_parent and not documented and not any(d for _, d in ancestors):
            undocumented.append(f"line {i + 1}: {line.strip()}")
        ancestors.append((indent, documented))
    assert not undocumented, undocumented


# --- every object against its schema -------------------------------------------------------
@functools.cache
def _kubernetes_registry(version: str) -> tuple[Path, Registry]:
    folder = resources.files("kubernetes_validate") / "kubernetes-json-schema"
    base = Path(str(folder)) / f"v{version}-local-strict"
    definitions = json.loads((base / "_definitions.json").read_text())
    return base, Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))


@functools.cache
def _kubernetes_validator(version: str, kind: str, api_version: str) -> jsonschema.Validator:
    base, registry = _kubernetes_registry(version)
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    path = base / f"{kind.lower()}-{group}.json"
    assert path.is_file(), f"no Kubernetes {version} schema for {api_version} {kind}"
    schema = json.loads(path.read_text())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _closed_object(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD's openAPIV3Schema where unknown fields fail (the API server would drop them
    silently); apiVersion, kind and metadata are the API server's, never the CRD's."""
    properties = {k: _closed(v) for k, v in schema.get("properties", {}).items()}
    properties["metadata"] = {"type": "object"}
    return {
        **schema,
        "properties": properties | {"apiVersion": {"type": "string"}, "kind": {"type": "string"}},
        "additionalProperties": False,
    }


def _closed(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if out.get(exclusive) is True:  # OpenAPI v3.0's flag → JSON Schema's number
            out[exclusive] = out.pop(bound)
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _crd_files() -> dict[str, list[dict[str, Any]]]:
    return {
        p.name: [d for d in yaml.safe_load_all(p.read_text()) if d]
        for p in sorted((CHART / "crds").glob("*.yaml"))
    }


@functools.cache
def _custom_validators() -> dict[tuple[str, str], jsonschema.Validator]:
    """(apiVersion, kind) → validator: the chart's CRDs and the published ones."""
    schemas: dict[tuple[str, str], Any] = {}
    for docs in _crd_files().values():
        for crd in docs:
            for version in crd["spec"]["versions"]:
                key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
                schemas[key] = version["schema"]["openAPIV3Schema"]
    for file, key in (
        ("rayclusters.ray.io.v1.json.gz", ("ray.io/v1", "RayCluster")),
        (
            "servicemonitors.monitoring.coreos.com.v1.json.gz",
            ("monitoring.coreos.com/v1", "ServiceMonitor"),
        ),
        (
            "prometheusrules.monitoring.coreos.com.v1.json.gz",
            ("monitoring.coreos.com/v1", "PrometheusRule"),
        ),
    ):
        schemas[key] = json.loads(gzip.decompress((SCHEMAS / file).read_bytes()))
    return {key: jsonschema.Draft7Validator(_closed_object(s)) for key, s in schemas.items()}


def _problems(obj: dict[str, Any]) -> list[str]:
    key = (obj["apiVersion"], obj["kind"])
    custom = _custom_validators().get(key)
    validators = (
        [("CRD", custom)]
        if custom
        else [(v, _kubernetes_validator(v, obj["kind"], obj["apiVersion"])) for v in KUBE_VERSIONS]
    )
    where = f"{obj['kind']}/{obj['metadata']['name']}"
    return [
        f"{where} ({source}) at {'/'.join(map(str, error.absolute_path))}: {error.message[:300]}"
        for source, validator in validators
        for error in validator.iter_errors(obj)
    ]


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_every_rendered_object_is_valid(rendered: dict[str, Rendered], name: str) -> None:
    objects = rendered[name].objects
    assert objects
    problems = [p for obj in objects for p in _problems(obj)]
    assert not problems, "\n".join(problems)
    for obj in objects:
        assert obj["metadata"].get("namespace", NAMESPACE) == NAMESPACE
        assert len(obj["metadata"]["name"]) <= 63, obj["metadata"]["name"]
        if obj["kind"] == "DifyModel":
            DifyModel.model_validate(obj)  # the operator's own check, stricter than the CRD
        elif obj["kind"] == "DifyIndex":
            DifyIndex.model_validate(obj)


def test_kopf_peering_crds_are_valid_for_every_supported_kubernetes() -> None:
    for crd in _crd_files()["kopf-peerings.yaml"]:
        assert not _problems(crd)


def test_the_repository_crds_are_valid_for_every_supported_kubernetes() -> None:
    problems = [
        p
        for name, docs in _crd_files().items()
        if name != "kopf-peerings.yaml"
        for crd in docs
        for p in _problems(crd)
    ]
    assert not problems, "\n".join(problems)


def test_a_long_release_name_is_cut_to_63_characters() -> None:
    objects = Rendered(render({"fullnameOverride": "x" * 70}, KUBERAY)).objects
    names = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert all(len(n) <= 63 for _, n in names), [n for n in names if len(n[1]) > 63]
    assert len(set(names)) == len(names)
    assert ("Deployment", "x" * 54 + "-operator") in names


# --- Ray --------------------------------------------------------------------------------
def test_plain_ray_on_a_cluster_without_kuberay(rendered: dict[str, Rendered]) -> None:
    out = rendered["defaults"]
    assert not out.all("RayCluster")
    assert not out.all("ServiceMonitor") and not out.all("PrometheusRule")
    head = out.container("Deployment", "dify-mirror-ray-head")
    assert head["command"][:4] == ["ray", "start", "--head", "--block"]
    assert "--dashboard-host=0.0.0.0" in head["command"]
    worker = out.container("Deployment", "dify-mirror-ray-worker-cpu")
    assert "--address=dify-mirror-ray-head.ai.svc:6379" in worker["command"]
    assert out.one("Service", "dify-mirror-ray-head")
    assert "plain Deployments" in out.notes
    # KubeRay present but not wanted: the same
    off = rendered["kuberay-off"]
    assert not off.all("RayCluster") and off.one("Deployment", "dify-mirror-ray-head")


def test_a_raycluster_when_kuberay_is_installed(rendered: dict[str, Rendered]) -> None:
    out = rendered["kuberay"]
    assert not [d for d in out.all("Deployment") if "ray" in d["metadata"]["name"]]
    spec = out.one("RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"] == {"mode": "token", "secretName": "dify-mirror-ray-auth"}
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert head["headService"]["metadata"]["name"] == "dify-mirror-ray-head"
    container = head["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["dashboard"] == 8265 and ports["serve"] == 8000 and ports["grpc"] == 9000
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "dify-mirror-ray-auth",
        "key": "auth_token",
    }
    assert [g["groupName"] for g in spec["workerGroupSpecs"]] == ["cpu"]
    # the operator reads the same token and reaches the same head
    operator = _env_by_name(out.container("Deployment", "dify-mirror-operator"))
    assert operator["RAY_AUTH_TOKEN"]["valueFrom"] == env["RAY_AUTH_TOKEN"]["valueFrom"]
    assert (
        operator["DIFY_MIRROR_RAY_DASHBOARD"]["value"] == "http://dify-mirror-ray-head.ai.svc:8265"
    )
    assert "RayCluster (KubeRay)" in out.notes


@pytest.mark.parametrize("name", ["gpu", "gpu-plain"])
def test_gpu_groups_ask_for_gpus_and_schedule_on_gpu_nodes_only(
    rendered: dict[str, Rendered], name: str
) -> None:
    pods = dict(rendered[name].pod_specs())
    gpu = next(spec for where, spec in pods.items() if where.endswith("gpu"))
    cpu = next(spec for where, spec in pods.items() if where.endswith("cpu"))
    gpus = VALUE_SETS[name][0]["ray"]["workerGroups"]["gpu"].get("gpus", 1)
    container = gpu["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    assert container["image"].endswith("-cuda")
    assert gpu["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu[
        "tolerations"
    ]
    assert "nvidia.com/gpu" not in json.dumps(cpu)
    if name == "gpu-plain":
        assert f"--num-gpus={gpus}" in container["command"]
    else:
        group = next(
            g
            for g in rendered[name].one("RayCluster")["spec"]["workerGroupSpecs"]
            if g["groupName"] == "gpu"
        )
        assert (group["minReplicas"], group["maxReplicas"]) == (0, 2)


# --- the operator -----------------------------------------------------------------------
def _env_by_name(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container["env"]}


def test_operator_deployment_probes_security_and_disruption_budget(
    rendered: dict[str, Rendered],
) -> None:
    out = rendered["kuberay"]
    deployment = out.one("Deployment", "dify-mirror-operator")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = _env_by_name(container)
    assert deployment["spec"]["replicas"] == 2
    port = int(env["DIFY_MIRROR_LIVENESS_PORT"]["value"])
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"health": port}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["requests"] and container["resources"]["limits"]
    pdb = out.one("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # peered: the record kopf looks for exists, in the namespace it watches
    peering = out.one("KopfPeering")
    assert peering["metadata"]["name"] == env["DIFY_MIRROR_PEERING"]["value"] == "dify-mirror"
    assert env["DIFY_MIRROR_CLUSTER_WIDE"]["value"] == "false"
    assert (
        env["DIFY_MIRROR_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    )


def test_minimal_operator_runs_standalone_without_a_budget(rendered: dict[str, Rendered]) -> None:
    out = rendered["minimal"]
    env = _env_by_name(out.container("Deployment", "dify-mirror-operator"))
    assert env["DIFY_MIRROR_PEERING"]["value"] == ""
    assert not out.all("KopfPeering") and not out.all("PodDisruptionBudget")
    assert not out.all("ServiceAccount")
    pod = out.one("Deployment", "dify-mirror-operator")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "my-operator"
    kinds = {o["kind"] for o in out.objects}
    assert not kinds & {"StatefulSet", "ServiceMonitor", "PrometheusRule", "Pod", "Ingress"}
    assert not [c for c in out.all("ConfigMap")]


def _rules(role: dict[str, Any]) -> set[tuple[str, str, str, str]]:
    return {
        (group, resource, verb, ",".join(rule.get("resourceNames", [])))
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def _expand(group: str, resources: str, verbs: str, names: str = "") -> set[tuple[str, ...]]:
    return {(group, r, v, names) for r in resources.split() for v in verbs.split()}


OPERATOR_RULES = (
    _expand("difymirror.dev", "difymodels difyindexes", "get list watch patch")
    | _expand("difymirror.dev", "difymodels/status difyindexes/status", "get patch")
    | _expand("", "events", "create")
)
GATEWAY_RULES = (
    _expand("difymirror.dev", "difymodels", "get list create patch delete")
    | _expand("difymirror.dev", "difyindexes", "get list create delete")
    | _expand("", "configmaps", "get patch", "dify-mirror-audit-checkpoint")
)


def test_rbac_is_least_privilege_and_namespaced(rendered: dict[str, Rendered]) -> None:
    out = rendered["kuberay"]
    assert not out.all("ClusterRole") and not out.all("ClusterRoleBinding")
    operator = out.one("Role", "dify-mirror-operator")
    assert _rules(operator) == OPERATOR_RULES | _expand(
        "kopf.dev", "kopfpeerings", "get patch", "dify-mirror"
    ) | _expand("kopf.dev", "kopfpeerings", "list watch")
    assert _rules(out.one("Role", "dify-mirror-gateway")) == GATEWAY_RULES
    for binding, account in (
        ("dify-mirror-operator", "dify-mirror-operator"),
        ("dify-mirror-gateway", "dify-mirror-ray"),
    ):
        subjects = out.one("RoleBinding", binding)["subjects"]
        assert subjects == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    head = out.one("RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    assert head["serviceAccountName"] == "dify-mirror-ray"
    for name, objs in rendered.items():
        for role in objs.all("Role") + objs.all("ClusterRole"):
            for group, resource, verb, _ in _rules(role):
                assert "*" not in (group, resource, verb), (name, role["metadata"]["name"])
                assert resource != "secrets", (name, role["metadata"]["name"])


def test_cluster_wide_operator_gets_a_cluster_role_and_cluster_peering(
    rendered: dict[str, Rendered],
) -> None:
    out = rendered["clusterwide"]
    role = out.one("ClusterRole")
    assert _rules(role) == OPERATOR_RULES | _expand(
        "kopf.dev", "clusterkopfpeerings", "get patch", "dify-mirror"
    ) | _expand("kopf.dev", "clusterkopfpeerings", "list watch")
    assert "namespace" not in role["metadata"]
    binding = out.one("ClusterRoleBinding")
    assert binding["roleRef"]["kind"] == "ClusterRole"
    assert out.one("ClusterKopfPeering") and not out.all("KopfPeering")
    assert [r["metadata"]["name"] for r in out.all("Role")] == ["dify-mirror-gateway"]
    env = _env_by_name(out.container("Deployment", "dify-mirror-operator"))
    assert env["DIFY_MIRROR_CLUSTER_WIDE"]["value"] == "true"


# --- gateway: Service, Ingress, NetworkPolicy ---------------------------------------------
def _head_pod(out: Rendered) -> dict[str, Any]:
    clusters = out.all("RayCluster")
    if clusters:
        return clusters[0]["spec"]["headGroupSpec"]["template"]
    return out.one("Deployment", "dify-mirror-ray-head")["spec"]["template"]


@pytest.mark.parametrize("name", ["defaults", "kuberay"])
def test_gateway_service_reaches_the_head_on_8080_and_9000(
    rendered: dict[str, Rendered], name: str
) -> None:
    out = rendered[name]
    service = out.one("Service", "dify-mirror-gateway")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert (ports["http"]["port"], ports["grpc"]["port"]) == (8080, 9000)
    head = _head_pod(out)
    assert service["spec"]["selector"].items() <= head["metadata"]["labels"].items()
    named = {p["name"]: p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
    # Serve's HTTP proxy listens on the operator's DIFY_MIRROR_PORT, gRPC on _GRPC_PORT
    env = _env_by_name(out.container("Deployment", "dify-mirror-operator"))
    assert named[ports["http"]["targetPort"]] == int(env["DIFY_MIRROR_PORT"]["value"])
    assert named[ports["grpc"]["targetPort"]] == int(env["DIFY_MIRROR_GRPC_PORT"]["value"])


def test_ingress_with_tls_and_grpc_routing(rendered: dict[str, Rendered]) -> None:
    out = rendered["tls"]
    http = out.one("Ingress", "dify-mirror-gateway")
    grpc = out.one("Ingress", "dify-mirror-gateway-grpc")
    assert http["spec"]["ingressClassName"] == grpc["spec"]["ingressClassName"] == "nginx"
    assert http["spec"]["tls"] == [{"secretName": "dify-tls", "hosts": ["api.dify.example"]}]
    assert grpc["spec"]["tls"] == [{"secretName": "dify-tls", "hosts": ["grpc.dify.example"]}]
    assert grpc["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == (
        "GRPC"
    )
    for ingress, host, port in (
        (http, "api.dify.example", "http"),
        (grpc, "grpc.dify.example", "grpc"),
    ):
        (rule,) = ingress["spec"]["rules"]
        backend = rule["http"]["paths"][0]["backend"]["service"]
        assert (rule["host"], backend["name"], backend["port"]["name"]) == (
            host,
            "dify-mirror-gateway",
            port,
        )
    env = _env_by_name(out.container("Deployment", "dify-mirror-operator"))
    assert env["DIFY_MIRROR_GATEWAY_URL"]["value"] == "https://api.dify.example"
    assert "export API=https://api.dify.example" in out.notes
    assert not out.all("NetworkPolicy")


def test_network_policy_lets_only_ingress_and_prometheus_reach_the_gateway(
    rendered: dict[str, Rendered],
) -> None:
    out = rendered["networkpolicy"]
    policy = out.one("NetworkPolicy", "dify-mirror-gateway")
    selector = policy["spec"]["podSelector"]["matchExpressions"]
    components = next(e["values"] for e in selector if e["key"] == "app.kubernetes.io/component")
    head_labels = _head_pod(out)["metadata"]["labels"]
    assert head_labels["app.kubernetes.io/component"] in components
    ingress_rule, prometheus_rule, release_rule = policy["spec"]["ingress"]
    assert ingress_rule["from"][0]["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}
    }
    assert {p["port"] for p in ingress_rule["ports"]} == {"serve", "grpc"}
    assert prometheus_rule["from"][0]["podSelector"] == {
        "matchLabels": {"app.kubernetes.io/name": "prometheus"}
    }
    assert {p["port"] for p in prometheus_rule["ports"]} == {"serve", "metrics"}
    assert release_rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == (
        RELEASE
    )
    servers = out.one("NetworkPolicy", "dify-mirror-servers")
    components = servers["spec"]["podSelector"]["matchExpressions"][1]["values"]
    assert components == ["postgresql", "redis", "rabbitmq", "qdrant"]


# --- settings: values → operator env → OperatorSettings → gateway options -------------------
def _environment(container: dict[str, Any], secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: secretKeyRef read from the
    rendered Secrets, fieldRef metadata.namespace, `$(VAR)` of earlier variables. A
    reference to a Secret the chart does not render becomes `<secret:name/key>`."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            value = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                lambda m: env.get(m.group(1), m.group(0)),
                item["value"],
            )
        elif "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            if ref["name"] in secrets:
                found = secrets[ref["name"]].get(ref["key"])
                if found is None:
                    assert ref.get("optional"), f"{ref} is not in the rendered Secret"
                    continue
                value = found
            else:
                value = f"<secret:{ref['name']}/{ref['key']}>"
        else:
            assert item["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
            value = NAMESPACE
        env[item["name"]] = value
    return env


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Sets a process environment of exactly these DIFY_MIRROR_*/RAY_* variables."""

    def use(env: dict[str, str]) -> None:
        for name in list(os.environ):
            if name.startswith(("DIFY_MIRROR_", "RAY_")):
                monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)

    yield use


def _attr(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _secret_values(out: Rendered) -> list[str]:
    return [v for data in out.secrets().values() for v in data.values() if len(v) >= 8]


def test_every_gateway_value_has_a_setting_row() -> None:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["gateway"]

    def leaves(node: dict[str, Any], prefix: str = "") -> set[str]:
        out = set()
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict) and value and key != "routeLimits":
                out |= leaves(value, f"{path}.")
            else:
                out.add(path)
        return out

    mapped = {path for path, *_ in GATEWAY_SETTINGS}
    unmapped = {p for p in leaves(defaults) if not p.startswith(GATEWAY_OBJECT_KEYS)}
    assert unmapped == mapped


def test_values_reach_the_gateway_options_the_operator_applies(
    rendered: dict[str, Rendered], environ: Any
) -> None:
    out = rendered["settings"]
    container = out.container("Deployment", "dify-mirror-operator")
    environ(_environment(container, out.secrets()))
    settings = OperatorSettings()
    options = serve_options(settings)
    gateway = options.gateway
    for path, value, attribute, expected in GATEWAY_SETTINGS:
        want = value if expected is None else expected
        assert _attr(gateway, attribute) == want, f"gateway.{path} → {attribute}"
    assert gateway.control == "kubernetes"
    assert gateway.dashboard_url == "http://dify-mirror-ray-head.ai.svc:8265"
    assert (gateway.grpc_host, gateway.grpc_port, options.port) == ("0.0.0.0", 9000, 8000)
    assert gateway.security.database and gateway.security.redis and gateway.cache.redis
    assert gateway.tasks.database
    assert options.qdrant_url == "http://dify-mirror-qdrant.ai.svc:6333"
    assert settings.peering == "dify-mirror" and settings.namespace == NAMESPACE
    assert settings.gateway_url == "http://dify-mirror-gateway.ai.svc:8080"
    # the operator holds no server secret: it only learns that one is configured
    assert settings.database_url is None and settings.redis_url is None
    assert settings.broker_url is None and settings.key_pepper is None
    config = json.dumps(render_serve_config(DesiredState(), options))
    assert [s for s in _secret_values(out) if s in config] == []


def _paths(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict) and key != "route_limits":
            out |= _paths(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("name", ["defaults", "kuberay", "minimal", "external"])
def test_the_default_settings_are_the_applications_defaults(
    rendered: dict[str, Rendered], name: str, environ: Any
) -> None:
    """values.yaml repeats the gateway's defaults, except where the chart means to differ."""
    chart = _paths(serve_options(_operator(rendered[name], environ)).gateway.model_dump())
    environ({})
    plain = _paths(Settings().gateway_options().model_dump())
    differs = {key for key in chart if chart[key] != plain[key]}
    meant = {
        "home",  # /tmp/dify-mirror on the Ray nodes
        "control",  # kubernetes: DifyModel objects
        "dashboard_url",
        "grpc_host",  # 0.0.0.0: reached through the Service
        "replicas",  # 2, with the bundled Redis
        "security.require_totp_for_admin",  # on in a cluster
        "security.audit_configmap",
        "security.database",  # the bundled or external servers
        "security.redis",
        "cache.redis",
        "tasks.database",
        "tasks.broker",
    }
    assert differs <= meant, differs - meant
    if name == "defaults":
        assert chart["security.require_totp_for_admin"] and chart["replicas"] == 2


def _operator(out: Rendered, environ: Any) -> OperatorSettings:
    environ(_environment(out.container("Deployment", "dify-mirror-operator"), out.secrets()))
    return OperatorSettings()


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_no_secret_value_in_plain_sight(rendered: dict[str, Rendered], name: str) -> None:
    """Secret values live in Secrets only: no `value:` of any env, no ConfigMap, no
    RayCluster or other object holds one."""
    out = rendered[name]
    secrets = _secret_values(out)
    assert secrets or name == "external"
    for obj in out.objects:
        if obj["kind"] != "Secret":
            text = json.dumps(obj)
            leaked = [s for s in secrets if s in text]
            assert not leaked, f"{obj['kind']}/{obj['metadata']['name']} holds a secret"
    for url in (EXTERNAL_DB, EXTERNAL_BROKER, "S3cret"):
        assert all(url not in json.dumps(o) for o in out.objects if o["kind"] != "Secret")


@pytest.mark.parametrize("name", ["defaults", "kuberay", "networkpolicy", "external", "minimal"])
def test_ray_pods_can_read_every_secret_the_options_promise(
    rendered: dict[str, Rendered], name: str, environ: Any
) -> None:
    """What the gateway replicas read where they run (security/secrets.py): the options
    say a database/Redis/broker is configured only when the Ray pods hold its URL."""
    out = rendered[name]
    options = serve_options(_operator(out, environ)).gateway
    secrets = out.secrets()
    for where, pod in out.pod_specs():
        if "ray" not in where:
            continue
        env = _environment(pod["containers"][0], secrets)
        elsewhere = {k for k, v in env.items() if v.startswith("<secret:")}  # existingSecret
        environ({k: v for k, v in env.items() if k not in elsewhere})
        ray_side = Settings()

        def configured(
            secret: str, ray_side: Settings = ray_side, elsewhere: set = elsewhere
        ) -> bool:
            return (
                ray_side.secret(secret) is not None or f"DIFY_MIRROR_{secret.upper()}" in elsewhere
            )

        assert configured("database_url") == options.security.database, where
        assert configured("redis_url") == options.security.redis, where
        assert configured("broker_url") == (options.tasks.broker != "embedded"), where
        assert configured("key_pepper") and configured("bootstrap_key"), where
        Secrets.load(ray_side.state_dir).require(
            options.security.database and "DIFY_MIRROR_DATABASE_URL" not in elsewhere,
            options.security.redis and "DIFY_MIRROR_REDIS_URL" not in elsewhere,
        )
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"]
        if name == "external":
            assert ray_side.secret("database_url") == EXTERNAL_DB
            assert ray_side.secret("broker_url") == EXTERNAL_BROKER
            assert env["DIFY_MIRROR_REDIS_URL"] == "<secret:my-redis/uri>"
            assert env["DIFY_MIRROR_KEY_PEPPER"] == "<secret:my-dify-secrets/key_pepper>"
            assert env["RAY_AUTH_TOKEN"] == "<secret:my-ray-token/auth_token>"
        elif options.security.database:
            password = secrets["dify-mirror-postgresql"]["password"]
            assert ray_side.secret("database_url") == (
                f"postgresql://dify:{password}@dify-mirror-postgresql.ai.svc:5432/dify"
            )
            redis = secrets["dify-mirror-redis"]["password"]
            assert ray_side.secret("redis_url") == (
                f"redis://:{redis}@dify-mirror-redis.ai.svc:6379/0"
            )
            broker = (
                f"redis://:{redis}@dify-mirror-redis.ai.svc:6379/1"
                if options.tasks.broker == "redis"
                else f"amqp://dify:{secrets['dify-mirror-rabbitmq']['password']}"
                "@dify-mirror-rabbitmq.ai.svc:5672//"
            )
            assert ray_side.secret("broker_url") == broker


# --- backing servers ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("server", "port"),
    [("postgresql", 5432), ("redis", 6379), ("rabbitmq", 5672), ("qdrant", 6333)],
)
def test_bundled_servers_are_statefulsets_with_a_volume(
    rendered: dict[str, Rendered], server: str, port: int
) -> None:
    out = rendered["networkpolicy"]  # every server bundled
    name = f"dify-mirror-{server}"
    statefulset = out.one("StatefulSet", name)
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    pod = statefulset["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"] is False
    service = out.one("Service", name)
    assert port in [p["port"] for p in service["spec"]["ports"]]
    if server != "qdrant":  # kept: the volume outlives the release, so must its password
        assert out.secrets()[name]["password"]
        annotations = out.one("Secret", name)["metadata"]["annotations"]
        assert annotations["helm.sh/resource-policy"] == "keep"
    external = rendered["external"]
    assert not external.all("StatefulSet")


def test_external_servers_come_from_values_or_existing_secrets(
    rendered: dict[str, Rendered],
) -> None:
    out = rendered["external"]
    assert out.secrets() == {
        "dify-mirror-external": {"database_url": EXTERNAL_DB, "broker_url": EXTERNAL_BROKER}
    }
    env = _env_by_name(out.container("Deployment", "dify-mirror-operator"))
    assert env["DIFY_MIRROR_QDRANT_URL"]["value"] == "https://qdrant.example:6333"
    assert env["DIFY_MIRROR_BROKER"]["value"] == "amqp"


# --- observability, tests, notes ------------------------------------------------------------
def test_observability_objects(rendered: dict[str, Rendered]) -> None:
    out = rendered["kuberay"]
    monitor = out.one("ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/v1/metrics")
    service = out.one("Service", "dify-mirror-gateway")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    rules = out.one("PrometheusRule")
    alerts = yaml.safe_load((ROOT / "observability/prometheus/alerts.yaml").read_text())
    assert rules["spec"]["groups"] == alerts["groups"]
    board = out.one("ConfigMap", "dify-mirror-dashboard")
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    original = json.loads((ROOT / "observability/grafana/dify-mirror.json").read_text())
    assert json.loads(board["data"]["dify-mirror.json"]) == original
    assert "ServiceMonitor has no key" in out.notes
    keyed = Rendered(render({"metrics": {"serviceMonitor": {"keySecret": "prom-key"}}}, PROMETHEUS))
    (endpoint,) = keyed.one("ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["authorization"]["credentials"] == {"name": "prom-key", "key": "key"}
    forced = Rendered(render({"metrics": {"serviceMonitor": {"enabled": True}}}))
    assert forced.one("ServiceMonitor") and not forced.all("PrometheusRule")


def test_helm_test_hook_calls_readyz_and_one_inference(rendered: dict[str, Rendered]) -> None:
    out = rendered["kind"]
    pod = out.one("Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    env = _env_by_name(container)
    assert env["GATEWAY"]["value"] == "http://dify-mirror-gateway:8080"
    assert env["MODEL"]["value"] == "demo-llm" and env["TASK"]["value"] == "text-generation"
    assert env["KEY"]["valueFrom"]["secretKeyRef"]["key"] == "bootstrap_key"
    script = container["command"][-1]
    compile(script, "helm-test", "exec")
    assert '"/readyz"' in script and '"/v1/inference"' in script
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert out.one("DifyModel", "demo-llm")


def test_notes_say_how_to_reach_the_api_and_get_the_first_admin_key(
    rendered: dict[str, Rendered],
) -> None:
    notes = rendered["defaults"].notes
    assert "get secret dify-mirror-secrets -o jsonpath='{.data.bootstrap_key}'" in notes
    assert "port-forward svc/dify-mirror-gateway 8080:8080 9000:9000" in notes
    assert "keys create --name admin --scopes admin --totp" in notes
    assert "my-dify-secrets" in rendered["external"].notes


def test_gateway_options_default_replicas_need_redis() -> None:
    """The chart's refusal mirrors the gateway's own (GatewayOptions)."""
    with pytest.raises(ValueError, match="DIFY_MIRROR_REDIS_URL"):
        GatewayOptions(replicas=2)


def test_crd_bounds_hold_as_the_api_server_reads_them() -> None:
    """OpenAPI's `exclusiveMinimum: true` is a flag on `minimum`, not a bound of 1."""
    validator = _custom_validators()[("difymirror.dev/v1alpha1", "DifyModel")]

    def model(generation: dict[str, Any]) -> dict[str, Any]:
        spec = {"modelId": "builtin:demo-llm", "generation": generation}
        return {"apiVersion": "difymirror.dev/v1alpha1", "kind": "DifyModel", "metadata": {}} | {
            "spec": spec
        }

    assert not list(validator.iter_errors(model({"topP": 0.5})))
    assert list(validator.iter_errors(model({"topP": 0})))


def test_skaffold_and_make_e2e_name_what_the_chart_creates(rendered: dict[str, Rendered]) -> None:
    """The Service skaffold forwards, the Secret `make e2e` reads the key from, and the
    values skaffold sets: as the kind values render them."""
    kind = rendered["kind"]
    config = yaml.safe_load((ROOT / "skaffold.yaml").read_text())
    (release,) = config["deploy"]["helm"]["releases"]
    assert release["name"] == RELEASE
    service = kind.one("Service", "dify-mirror-gateway")
    ports = {p["port"] for p in service["spec"]["ports"]}
    assert {f["port"] for f in config["portForward"]} == ports == {8080, 9000}
    assert all(f["resourceName"] == "dify-mirror-gateway" for f in config["portForward"])
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for dotted in release["setValueTemplates"]:
        node = values
        for part in dotted.split("."):
            assert isinstance(node, dict) and part in node, f"skaffold sets {dotted}: no such value"
            node = node[part]
    script = (ROOT / "e2e" / "kind.sh").read_text()
    secret = re.search(r"get secret (\S+) -o jsonpath='\{\.data\.(\w+)\}'", script)
    assert secret, "kind.sh reads the bootstrap key from a Secret"
    assert secret.group(2) in kind.secrets()[secret.group(1)]
    assert "service/dify-mirror-gateway" in script
    assert re.search(r"-f charts/dify-mirror/ci/kind-values.yaml", script)
