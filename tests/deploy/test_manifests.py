"""deploy/kubernetes/: valid against the Kubernetes and KServe schemas, and consistent with each other and the server.

Schema validation catches misspelled or misplaced fields; the consistency checks catch what no schema can: a
probe on the wrong port, a drain longer than Kubernetes waits, an HPA scaling on a metric nobody produces.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from serving.metrics import Metrics
from serving.settings import ENV_PREFIX, Settings, parse_settings
from tests.deploy.conftest import (
    KUBERNETES_VERSIONS,
    MANIFEST_FILES,
    SETTING_VARIABLES,
    container_env,
    effective_settings,
    load_manifests,
    manifest_name,
)
from tests.deploy.dockerfile import Stage
from tests.deploy.generate_kserve_fields import class_literals, reachable_fields
from tests.deploy.kserve_fields import KServeFields

STOP_SECONDS = 2  # after the drain: the last responses go out (1 s), models unload; measured well under this
KUBERNETES_DEFAULT_GRACE = 30  # terminationGracePeriodSeconds when a pod spec sets none
GPU = "nvidia.com/gpu"


def _is_kserve(document: dict[str, Any]) -> bool:
    return str(document.get("apiVersion", "")).startswith("serving.kserve.io/")


# Files with at least one built-in Kubernetes object; KServe's custom resources are checked against KServe's fields.
KUBERNETES_MANIFESTS = [path for path in MANIFEST_FILES if not all(map(_is_kserve, load_manifests(path)))]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", KUBERNETES_MANIFESTS, ids=manifest_name)
def test_kubernetes_schema(path: Path, version: str) -> None:
    """kubernetes-validate, strict: unknown fields fail, and so does a kind it has no schema for."""
    for document in load_manifests(path):
        if _is_kserve(document):
            continue
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(part) for part in error.path)
            pytest.fail(f"{manifest_name(path)} {document['kind']} at {where}: {error.message}", pytrace=False)
        except kubernetes_validate.SchemaNotFoundError as error:
            pytest.fail(f"{manifest_name(path)}: {error.message}", pytrace=False)


def test_kubernetes_schema_check_fails_on_an_unknown_field(by_kind: dict[str, Any]) -> None:
    """Strict mode is on: a misspelled field deep in the pod template fails."""
    deployment = copy.deepcopy(by_kind["Deployment"])
    deployment["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["grpc"]["prot"] = 8001
    with pytest.raises(kubernetes_validate.ValidationError, match="'prot' was unexpected"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.fixture(scope="module")
def kserve_fields() -> KServeFields:
    return KServeFields.load(KUBERNETES_VERSIONS[-1])


def test_kserve_resources_match_kserve_fields(
    kserve_fields: KServeFields, manifests: dict[str, list[dict[str, Any]]]
) -> None:
    """Every KServe object (only v1beta1 InferenceServices have a field list) against the SDK's fields."""
    checked = 0
    for name, documents in manifests.items():
        for document in filter(_is_kserve, documents):
            errors = kserve_fields.validate(document)
            assert not errors, f"{name}:\n" + "\n".join(errors)
            checked += 1
    assert checked, "no InferenceService under deploy/kubernetes"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda p: p.update(protocolVersion="v2"), "spec.predictor.protocolVersion: unknown field"),
        (lambda p: p.update(minReplicas="1"), "spec.predictor.minReplicas: '1' is a str, expected int"),
        (lambda p: p.update(model={"modelFormat": {"name": "onnx"}, "protocolVersoin": "v2"}),
         "spec.predictor.model.protocolVersoin: unknown field (not in V1beta1ModelSpec)"),
        (lambda p: p["containers"][0].update(grpcPort=8001), "'grpcPort' was unexpected"),
        (lambda p: p["containers"][0]["ports"][0].update(containerPort="8001"),
         "spec.predictor.containers[0].ports[0].containerPort: '8001' is not of type 'integer'"),
    ],
    ids=["unknown-kserve-field", "wrong-kserve-type", "nested-kserve-field", "unknown-container-field",
         "wrong-container-type"],
)  # fmt: skip
def test_kserve_check_fails_on(
    kserve_fields: KServeFields, by_kind: dict[str, Any], edit: Callable[[dict[str, Any]], object], expected: str
) -> None:
    """The KServe check is not vacuous: a misspelled or mistyped field fails, in KServe's part and Kubernetes'."""
    service = copy.deepcopy(by_kind["InferenceService"])
    edit(service["spec"]["predictor"])
    errors = kserve_fields.validate(service)
    assert any(expected in error for error in errors), errors


def test_kserve_check_accepts_protocol_version_where_kserve_has_it(
    kserve_fields: KServeFields, by_kind: dict[str, Any]
) -> None:
    service = copy.deepcopy(by_kind["InferenceService"])
    service["spec"]["predictor"]["model"] = {"modelFormat": {"name": "onnx"}, "protocolVersion": "grpc-v2"}
    assert kserve_fields.validate(service) == []


def test_kserve_fields_refer_only_to_known_types(kserve_fields: KServeFields) -> None:
    """Every type the field list names is KServe's, a primitive, or in the bundled Kubernetes schemas."""
    # Knative's traffic target only appears in the status, which manifests do not set.
    assert kserve_fields.unresolved_types() <= {"KnativeDevServingPkgApisServingV1TrafficTarget"}


# --- consistency -------------------------------------------------------------------------------------------------


def _pod_spec(by_kind: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = by_kind["Deployment"]["spec"]["template"]["spec"]
    return spec


def _server_container(by_kind: dict[str, Any]) -> dict[str, Any]:
    (container,) = _pod_spec(by_kind)["containers"]
    return dict(container)


def _kserve_container(by_kind: dict[str, Any]) -> dict[str, Any]:
    (container,) = by_kind["InferenceService"]["spec"]["predictor"]["containers"]
    return dict(container)


def _port(container: dict[str, Any], name: str) -> int:
    (port,) = [each["containerPort"] for each in container["ports"] if each["name"] == name]
    return int(port)


def _probes(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe") if kind in container}


def _assert_selects(selector: dict[str, str], labels: dict[str, str], what: str) -> None:
    assert selector, f"{what}: an empty selector selects everything"
    assert selector.items() <= labels.items(), f"{what} {selector} does not select the pods {labels}"


@pytest.fixture(scope="module")
def server_settings(runtime_stage: Stage, by_kind: dict[str, Any]) -> Settings:
    return effective_settings(runtime_stage.env(), _server_container(by_kind))


@pytest.fixture(scope="module")
def kserve_settings(runtime_stage: Stage, by_kind: dict[str, Any]) -> Settings:
    return effective_settings(runtime_stage.env(), _kserve_container(by_kind))


@pytest.mark.parametrize("container_of", [_server_container, _kserve_container], ids=["deployment", "kserve"])
def test_env_names_only_variables_the_server_reads(
    by_kind: dict[str, Any], container_of: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    names = {name for name in container_env(container_of(by_kind)) if name.startswith(ENV_PREFIX)}
    assert names <= SETTING_VARIABLES, f"classify-server reads none of {names - SETTING_VARIABLES}"


def test_deployment_ports_and_probes_agree_with_the_server(
    by_kind: dict[str, Any], server_settings: Settings, runtime_stage: Stage
) -> None:
    container = _server_container(by_kind)
    grpc_port, metrics_port = _port(container, "grpc"), _port(container, "metrics")
    assert (grpc_port, metrics_port) == (server_settings.port, server_settings.metrics_port) == (8001, 8002)
    exposed = {int(word) for each in runtime_stage.all("EXPOSE") for word in each.text.split()}
    assert {grpc_port, metrics_port} <= exposed
    probes = _probes(container)
    assert set(probes) == {"startupProbe", "readinessProbe", "livenessProbe"}
    for kind, probe in probes.items():
        assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, f"{kind}: a native gRPC probe"
        assert probe["grpc"]["port"] == grpc_port, f"{kind} probes port {probe['grpc']['port']}"
        assert "service" not in probe["grpc"], f"{kind}: the server reports its overall health as service ''"
    annotations = by_kind["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == metrics_port
    assert annotations["prometheus.io/path"] == "/metrics"


def test_startup_probe_allows_for_warm_up(by_kind: dict[str, Any]) -> None:
    probes = _probes(_server_container(by_kind))
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "model load and warm-up on a cold GPU"


def test_termination_grace_covers_pre_stop_and_drain(by_kind: dict[str, Any], server_settings: Settings) -> None:
    """SIGKILL must not cut a drain short: preStop pause + CLASSIFY_GRACE_PERIOD + stopping < the pod's grace."""
    container = _server_container(by_kind)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    sleep, seconds = command
    assert sleep == "sleep", command
    pause = float(seconds)
    grace = _pod_spec(by_kind)["terminationGracePeriodSeconds"]
    assert f"{ENV_PREFIX}GRACE_PERIOD" in container_env(container), "the drain is set explicitly, beside the grace"
    assert pause + server_settings.grace_period + STOP_SECONDS < grace, (pause, server_settings.grace_period, grace)


def test_kserve_container_agrees_with_the_server(by_kind: dict[str, Any], kserve_settings: Settings) -> None:
    service = by_kind["InferenceService"]
    container = _kserve_container(by_kind)
    assert container["name"] == "kserve-container"
    assert [port["name"] for port in container["ports"]] == ["h2c"], "one port (Knative), named h2c: gRPC"
    assert _port(container, "h2c") == kserve_settings.port == 8001
    for kind, probe in _probes(container).items():
        assert probe["grpc"]["port"] == kserve_settings.port, kind
    annotations = service["metadata"]["annotations"]
    assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "true"
    assert int(annotations["prometheus.kserve.io/port"]) == kserve_settings.metrics_port == 8002
    predictor = service["spec"]["predictor"]
    assert "terminationGracePeriodSeconds" not in predictor, "Knative rejects it"
    assert kserve_settings.grace_period + STOP_SECONDS < KUBERNETES_DEFAULT_GRACE
    assert predictor["minReplicas"] >= 1, "no scale to zero: warm-up on a GPU is slow"


@pytest.mark.parametrize("container_of", [_server_container, _kserve_container], ids=["deployment", "kserve"])
def test_one_gpu_requested_and_limited(
    by_kind: dict[str, Any], container_of: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    resources = container_of(by_kind)["resources"]
    assert resources["requests"][GPU] == resources["limits"][GPU] == 1, "an extended resource: request == limit"
    assert {"cpu", "memory"} <= resources["requests"].keys() & resources["limits"].keys()


def test_deployment_and_kserve_run_the_same_image_as_the_dockerfile_user(
    by_kind: dict[str, Any], runtime_stage: Stage
) -> None:
    image_user = int(runtime_stage.all("USER")[-1].text.partition(":")[0])
    deployment, kserve = _server_container(by_kind), _kserve_container(by_kind)
    assert deployment["image"] == kserve["image"]
    for security in (_pod_spec(by_kind)["securityContext"], kserve["securityContext"]):
        assert security["runAsNonRoot"] is True
        assert security["runAsUser"] == image_user


def test_selectors_select_the_pods(by_kind: dict[str, Any]) -> None:
    deployment = by_kind["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    _assert_selects(deployment["spec"]["selector"]["matchLabels"], labels, "Deployment selector")
    _assert_selects(by_kind["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"], labels, "PDB selector")
    for kind in ("Service", "HeadlessService"):
        _assert_selects(by_kind[kind]["spec"]["selector"], labels, f"{kind} selector")


def test_services_reach_the_grpc_port(by_kind: dict[str, Any], server_settings: Settings) -> None:
    container = _server_container(by_kind)
    names = {port["name"]: port["containerPort"] for port in container["ports"]}
    for kind in ("Service", "HeadlessService"):
        ports = {port["name"]: port for port in by_kind[kind]["spec"]["ports"]}
        grpc = ports["grpc"]
        target = grpc["targetPort"]
        assert names.get(target, target) == server_settings.port, f"{kind} grpc -> {target}"
        assert grpc["appProtocol"] == "kubernetes.io/h2c"
        for name, port in ports.items():
            assert port["targetPort"] in names or port["targetPort"] in names.values(), f"{kind} {name}"
    assert by_kind["HeadlessService"]["spec"]["clusterIP"] == "None"
    assert by_kind["Service"]["spec"]["type"] == "ClusterIP"


def test_hpa_scales_the_deployment(by_kind: dict[str, Any]) -> None:
    deployment, hpa = by_kind["Deployment"], by_kind["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"], "kind": "Deployment", "name": deployment["metadata"]["name"]
    }  # fmt: skip
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count; kubectl apply would reset it"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert by_kind["PodDisruptionBudget"]["spec"].get("maxUnavailable") == 1, "drains never blocked, one at a time"


def test_hpa_falls_back_to_cpu(by_kind: dict[str, Any]) -> None:
    metrics = by_kind["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert [metric["type"] for metric in metrics] == ["Pods", "Resource"], "the queue metric first, CPU after it"
    assert metrics[1]["resource"]["name"] == "cpu"
    assert metrics[1]["resource"]["target"]["type"] == "Utilization"
    assert "cpu" in _server_container(by_kind)["resources"]["requests"], "utilization is relative to the request"


@pytest.fixture(scope="module")
def exported_series() -> set[str]:
    """The sample names the server's /metrics has once a model is loaded and requests are answered."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.for_model("digits", "1")  # the per-model series, as the repository creates them at load
    metrics.request("digits", "1", "OK", 0.001)
    metrics.request("digits", "1", "UNAVAILABLE", 0.001)
    return {sample.name for family in registry.collect() for sample in family.samples}


def _adapter_rules(by_kind: dict[str, Any]) -> list[dict[str, Any]]:
    config = yaml.safe_load(by_kind["ConfigMap"]["data"]["config.yaml"])
    rules: list[dict[str, Any]] = config["rules"]
    return rules


def _exposed_name(rule: dict[str, Any]) -> tuple[str, str]:
    """(the Prometheus series a prometheus-adapter rule reads, the custom metric name it serves it as)."""
    match = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"])
    assert match, f"seriesQuery should start with a metric name: {rule['seriesQuery']}"
    series = match.group(0)
    naming = rule.get("name", {})
    pattern = naming.get("matches", "(.*)")
    template = naming.get("as", "$1" if re.compile(pattern).groups else "$0")
    assert re.search(pattern, series), f"name.matches {pattern} does not match {series}"
    return series, re.sub(pattern, re.sub(r"\$(\d+)", r"\\g<\1>", template), series)  # Go's $1: Python's \g<1>


def test_adapter_rules_read_series_the_server_exports(by_kind: dict[str, Any], exported_series: set[str]) -> None:
    for rule in _adapter_rules(by_kind):
        series, _ = _exposed_name(rule)
        assert series in exported_series, f"classify-server exports no {series}; it has {sorted(exported_series)}"
        overrides = rule["resources"]["overrides"]
        assert overrides["namespace"] == {"resource": "namespace"}
        assert overrides["pod"] == {"resource": "pod"}
        for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert placeholder in rule["metricsQuery"], f"metricsQuery lacks {placeholder}: not per pod"


def test_hpa_uses_a_metric_the_adapter_serves(by_kind: dict[str, Any]) -> None:
    served = {_exposed_name(rule)[1] for rule in _adapter_rules(by_kind)}
    used = [metric["pods"]["metric"]["name"] for metric in by_kind["HorizontalPodAutoscaler"]["spec"]["metrics"]
            if metric["type"] == "Pods"]  # fmt: skip
    assert used, "the HPA scales on a Pods metric from the server"
    assert set(used) <= served, f"the HPA uses {used}; the adapter serves {served}"


def test_server_settings_parse(server_settings: Settings, kserve_settings: Settings) -> None:
    """The manifests' values go through classify-server's own parser (a bad value would exit with a usage error)."""
    assert server_settings.device.value == kserve_settings.device.value == "cuda"
    assert server_settings.log_format == "json"
    assert parse_settings([], {}).grace_period > server_settings.grace_period, "shorter than the default on purpose"


def test_field_list_generator_reads_the_sdk_models(tmp_path: Path) -> None:
    """generate_kserve_fields (run by hand against the SDK) keys fields by JSON name and follows nested types."""
    models = tmp_path / "kserve" / "models"
    models.mkdir(parents=True)
    (models / "v1beta1_inference_service.py").write_text(
        "class V1beta1InferenceService(object):\n"
        "    openapi_types = {'api_version': 'str', 'spec': 'V1beta1Spec', 'metadata': 'V1ObjectMeta'}\n"
        "    attribute_map = {'api_version': 'apiVersion', 'spec': 'spec', 'metadata': 'metadata'}\n"
        "class V1beta1Spec(object):\n"
        "    openapi_types = {'min_replicas': 'int', 'containers': 'list[V1Container]', 'x': 'dict(str, V1beta1X)'}\n"
        "    attribute_map = {'min_replicas': 'minReplicas', 'containers': 'containers', 'x': 'x'}\n"
        "class V1beta1X(object):\n"
        "    openapi_types = {'flag': 'bool'}\n"
        "    attribute_map = {'flag': 'flag'}\n"
        "class V1beta1Unused(object):\n"
        "    openapi_types = {'a': 'str'}\n"
        "    attribute_map = {'a': 'a'}\n",
        encoding="utf-8",
    )
    assert reachable_fields(class_literals(models)) == {
        "V1beta1InferenceService": {"apiVersion": "str", "metadata": "V1ObjectMeta", "spec": "V1beta1Spec"},
        "V1beta1Spec": {"containers": "list[V1Container]", "minReplicas": "int", "x": "dict(str, V1beta1X)"},
        "V1beta1X": {"flag": "bool"},
    }
