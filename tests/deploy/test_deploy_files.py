"""Static checks of the files under deploy/, the Dockerfile and the install script.

`docker compose config` is not part of this suite: the docker client on the
development and CI machines has no compose plugin and no engine, so the compose
file is checked by parsing it here instead.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from streamer.config import ENV_PREFIX, Settings
from streamer.kafka.jars import DEFAULT_KAFKA_VERSION
from streamer.metrics import StreamerMetrics
from tests.deploy.promql_expressions import (
    DASHBOARD_FILE,
    DEPLOY_DIR,
    PROMETHEUS_DIR,
    PROMETHEUS_SERIES,
    REPO_ROOT,
    RULE_FILES,
    alert_rules,
    dashboard_expressions,
    dashboard_variable_selectors,
    exposed_metric_names,
    load_dashboard,
    metric_names,
    recording_rules,
)

COMPOSE_FILE = DEPLOY_DIR / "docker-compose.yml"
K8S_DIR = DEPLOY_DIR / "k8s"
YAMLLINT_CONFIG = DEPLOY_DIR / ".yamllint.yml"
DATASOURCE_FILE = DEPLOY_DIR / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER_FILE = DEPLOY_DIR / "grafana" / "provisioning" / "dashboards" / "streamer.yml"
DASHBOARD_UID = "streamer-overview"
REQUIRED_STREAMER_ENV = {
    "STREAMER_BOOTSTRAP_SERVERS",
    "STREAMER_INPUT_TOPICS",
    "STREAMER_OUTPUT_TOPIC",
    "STREAMER_DEAD_LETTER_TOPIC",
    "STREAMER_GROUP_ID",
    "STREAMER_MODEL",
    "STREAMER_METRICS_HOST",
    "STREAMER_METRICS_PORT",
}
# The service's shutdown deadline when STREAMER_SHUTDOWN_TIMEOUT_S is not set.
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
# Compose mounts whose host path the user supplies (the model is not in the repository).
USER_SUPPLIED_MOUNTS = {"${STREAMER_MODEL_DIR:-./models}"}


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_k8s_documents() -> list[dict]:
    documents = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        documents.extend(doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc)
    return documents


def k8s_object(kind: str, name: str | None = None) -> dict:
    matches = [
        doc for doc in load_k8s_documents()
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
    ]
    assert len(matches) == 1, f"expected one {kind} {name or ''} in {K8S_DIR}, found {len(matches)}"
    return matches[0]


def provisioned_datasource_uid() -> str:
    datasources = load_yaml(DATASOURCE_FILE)["datasources"]
    assert len(datasources) == 1
    return datasources[0]["uid"]


# YAML


def test_yamllint_deploy():
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-c", str(YAMLLINT_CONFIG), str(DEPLOY_DIR)],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_all_deploy_yaml_parses():
    paths = sorted([*DEPLOY_DIR.rglob("*.yml"), *DEPLOY_DIR.rglob("*.yaml")])

    assert len(paths) >= 10
    for path in paths:
        list(yaml.safe_load_all(path.read_text(encoding="utf-8")))


# Metric names in PromQL


def test_rules_use_defined_metrics():
    defined = exposed_metric_names(StreamerMetrics().registry) | PROMETHEUS_SERIES
    recorded = set(recording_rules())
    expressions = {f"recording rule {name}": expr for name, expr in recording_rules().items()}
    expressions.update({f"alert {name}": expr for name, expr in alert_rules().items()})

    for source, expr in expressions.items():
        for name in metric_names(expr):
            if ":" in name:
                assert name in recorded, f"{source} reads {name}, which no recording rule records"
            else:
                assert name in defined, f"{source} reads {name}, which StreamerMetrics does not define"


def test_dashboard_uses_defined_metrics():
    defined = exposed_metric_names(StreamerMetrics().registry) | PROMETHEUS_SERIES
    recorded = set(recording_rules())
    expressions = dashboard_expressions() + dashboard_variable_selectors()

    for expression in expressions:
        names = metric_names(expression.expr)
        assert names, f"{expression.source} selects no metric: {expression.expr}"
        for name in names:
            assert name in defined | recorded, f"{expression.source} reads {name}, which is not defined"


def test_recording_rule_names_follow_convention():
    for name in recording_rules():
        assert re.fullmatch(r"[a-z_]+:streamer_[a-z0-9_]+:[a-z0-9_]+", name), name


def test_metric_names_parser():
    assert metric_names('sum by (job, le) (rate(a_bucket{le="0.5", job=~"x|y"}[5m]))') == {"a_bucket"}
    assert metric_names("time() - b > 120 and on (job, instance) c:d:e unless f offset 5m") == {"b", "c:d:e", "f"}
    assert metric_names("histogram_quantile(0.99, x) * 1e3") == {"x"}


# Grafana


def test_dashboard_uid_and_datasources():
    dashboard = load_dashboard()
    uid = provisioned_datasource_uid()

    assert dashboard["uid"] == DASHBOARD_UID
    assert "${datasource}" not in DASHBOARD_FILE.read_text(encoding="utf-8")
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no targets"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid, f"{panel['title']} target {target['refId']}"
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == uid, variable["name"]


def test_dashboard_panel_ids_unique():
    ids = [panel["id"] for panel in load_dashboard()["panels"]]

    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(
    "metric",
    [
        "streamer_events_consumed_total",
        "streamer_events_produced_total",
        "streamer_end_to_end_latency_seconds_bucket",
        "streamer_inference_duration_seconds_bucket",
        "streamer_batch_events_bucket",
        "streamer_consumer_lag_records",
        "streamer_events_dead_lettered_total",
        "streamer_state_entities",
        "streamer_state_evictions_total",
        "streamer_state_expirations_total",
        "streamer_restore_partitions_in_progress",
        "streamer_restore_duration_seconds_bucket",
        "streamer_checkpoints_total",
        "streamer_commit_failures_total",
        "streamer_rebalances_total",
    ],
)
def test_dashboard_shows_metric(metric):
    dashboard_metrics = set()
    for expression in dashboard_expressions():
        dashboard_metrics |= metric_names(expression.expr)

    assert metric in dashboard_metrics


def test_dashboard_latency_quantiles():
    latency = [e.expr for e in dashboard_expressions() if "streamer_end_to_end_latency_seconds" in e.expr]

    for quantile in ("0.5", "0.95", "0.99"):
        assert any(expr.startswith(f"histogram_quantile({quantile},") for expr in latency), quantile


def test_dashboard_provider_path_is_mounted():
    provider_path = load_yaml(DASHBOARD_PROVIDER_FILE)["providers"][0]["options"]["path"]
    grafana_volumes = load_yaml(COMPOSE_FILE)["services"]["grafana"]["volumes"]
    targets = {volume.split(":")[1]: volume.split(":")[0] for volume in grafana_volumes}

    assert provider_path in targets
    assert (DEPLOY_DIR / targets[provider_path] / DASHBOARD_FILE.name).is_file()


# docker compose


def test_compose_services():
    services = load_yaml(COMPOSE_FILE)["services"]

    assert {"kafka", "streamer", "prometheus", "grafana"} <= set(services)


def test_compose_kafka_kraft():
    kafka = load_yaml(COMPOSE_FILE)["services"]["kafka"]
    environment = kafka["environment"]

    assert kafka["image"] == f"apache/kafka:${{KAFKA_VERSION:-{DEFAULT_KAFKA_VERSION}}}"
    assert set(environment["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "KAFKA_CONTROLLER_QUORUM_VOTERS" in environment
    assert "KAFKA_ZOOKEEPER_CONNECT" not in environment


def test_compose_streamer_environment():
    streamer = load_yaml(COMPOSE_FILE)["services"]["streamer"]
    environment = streamer["environment"]

    missing = REQUIRED_STREAMER_ENV - set(environment)
    assert not missing, f"streamer service lacks {sorted(missing)}"
    assert environment["STREAMER_METRICS_HOST"] == "0.0.0.0"
    assert str(environment["STREAMER_METRICS_PORT"]) == "9400"
    assert streamer["build"]["dockerfile"] == "Dockerfile"
    assert (DEPLOY_DIR / streamer["build"]["context"] / "Dockerfile").is_file()


def test_environment_names_are_settings():
    compose_env = set(load_yaml(COMPOSE_FILE)["services"]["streamer"]["environment"])
    configmap_env = set(k8s_object("ConfigMap")["data"])
    container = k8s_object("StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    pod_env = {item["name"] for item in container.get("env", [])}
    settings = {ENV_PREFIX + name.upper() for name in Settings.model_fields}

    for name in compose_env | configmap_env | pod_env:
        assert name in settings, f"{name} is not a streamer setting"


def test_compose_stop_grace_period_exceeds_shutdown_timeout():
    grace = load_yaml(COMPOSE_FILE)["services"]["streamer"]["stop_grace_period"]
    match = re.fullmatch(r"(\d+)s", grace)

    assert match, f"stop_grace_period {grace!r} is not in seconds"
    assert int(match.group(1)) > DEFAULT_SHUTDOWN_TIMEOUT_S


def test_compose_mounted_files_exist():
    services = load_yaml(COMPOSE_FILE)["services"]
    checked = 0
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source in USER_SUPPLIED_MOUNTS:
                continue
            if not source.startswith((".", "/")):
                continue  # a named volume
            assert (DEPLOY_DIR / source).exists(), f"service {name} mounts missing {source}"
            checked += 1

    assert checked >= 3


def test_compose_prometheus_rule_files_inside_mount():
    prometheus = load_yaml(COMPOSE_FILE)["services"]["prometheus"]
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in prometheus["volumes"]}
    config_flag = next(arg for arg in prometheus["command"] if arg.startswith("--config.file="))
    config_in_container = Path(config_flag.split("=", 1)[1])
    host_dir = DEPLOY_DIR / mounts[str(config_in_container.parent)]
    config = load_yaml(host_dir / config_in_container.name)

    for rule_file in config["rule_files"]:
        assert (host_dir / rule_file).is_file(), rule_file
    for rule_file in RULE_FILES:
        assert str(rule_file.relative_to(PROMETHEUS_DIR)) in config["rule_files"]


def test_prometheus_config_scrapes_service_and_replay():
    jobs = {job["job_name"] for job in load_yaml(PROMETHEUS_DIR / "prometheus.yml")["scrape_configs"]}

    # StreamerInstanceDown selects job="streamer".
    assert "up{job=\"streamer\"}" in alert_rules()["StreamerInstanceDown"]
    assert jobs == {"streamer", "streamer-replay"}


def test_replay_targets_file_is_valid():
    for path in (PROMETHEUS_DIR / "targets").glob("replay*.json"):
        assert isinstance(json.loads(path.read_text(encoding="utf-8")), list), path


# Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO_ROOT / "Dockerfile").read_text(encoding="utf-8")
    text = re.sub(r"\\\n", " ", text)
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def test_dockerfile_base_and_user():
    stage = final_stage(dockerfile_instructions())
    users = [rest for keyword, rest in stage if keyword == "USER"]

    assert stage[0][1].startswith("python:3.11-slim")
    assert users, "final stage has no USER"
    assert users[-1].split(":")[0] not in {"0", "root"}


def test_dockerfile_exec_form_entrypoint():
    stage = dict(final_stage(dockerfile_instructions()))

    assert json.loads(stage["ENTRYPOINT"]) == ["streamer"]
    assert json.loads(stage["CMD"]) == ["run"]
    assert stage["EXPOSE"].split()[0] == "9400"


def test_console_script_exists():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))

    assert "streamer" in pyproject["project"]["scripts"]


def test_dockerignore_keeps_build_inputs():
    lines = (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    copied = {rest.split()[0] for keyword, rest in dockerfile_instructions() if keyword == "COPY" and "--from" not in rest}

    for source in copied:
        assert f"!{source.rstrip('/')}" in lines or f"!{source.rstrip('/')}/" in lines, source


# Kubernetes


def test_k8s_statefulset_static_membership():
    container = k8s_object("StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item for item in container.get("env", [])}

    assert env["STREAMER_GROUP_INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_k8s_probes():
    container = k8s_object("StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    config = k8s_object("ConfigMap")["data"]

    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert ports[container[probe]["httpGet"]["port"]] == int(config["STREAMER_METRICS_PORT"]), probe


def test_k8s_grace_period_exceeds_shutdown_timeout():
    pod = k8s_object("StatefulSet")["spec"]["template"]["spec"]
    timeout = float(k8s_object("ConfigMap")["data"].get("STREAMER_SHUTDOWN_TIMEOUT_S", DEFAULT_SHUTDOWN_TIMEOUT_S))

    assert pod["terminationGracePeriodSeconds"] > timeout


def test_k8s_resource_requests():
    container = k8s_object("StatefulSet")["spec"]["template"]["spec"]["containers"][0]

    assert {"cpu", "memory"} <= set(container["resources"]["requests"])


def test_k8s_configmap_environment():
    config = k8s_object("ConfigMap")
    container = k8s_object("StatefulSet")["spec"]["template"]["spec"]["containers"][0]

    assert REQUIRED_STREAMER_ENV <= set(config["data"])
    assert config["data"]["STREAMER_METRICS_HOST"] == "0.0.0.0"
    assert {"configMapRef": {"name": config["metadata"]["name"]}} in container["envFrom"]


def test_k8s_services_and_selectors():
    statefulset = k8s_object("StatefulSet")
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    headless = k8s_object("Service", statefulset["spec"]["serviceName"])
    metrics = k8s_object("Service", "streamer-metrics")
    pdb = k8s_object("PodDisruptionBudget")

    assert headless["spec"]["clusterIP"] == "None"
    # Only the pods are annotated for scraping; an annotated Service as well would have each pod scraped twice.
    assert statefulset["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert "prometheus.io/scrape" not in metrics["metadata"].get("annotations", {})
    for selector in (headless["spec"]["selector"], metrics["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= pod_labels.items()
    assert statefulset["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_k8s_pdb():
    pdb = k8s_object("PodDisruptionBudget")

    assert pdb["apiVersion"] == "policy/v1"
    assert "maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"]


def test_k8s_podmonitor_sets_job():
    endpoint = k8s_object("PodMonitor")["spec"]["podMetricsEndpoints"][0]

    assert endpoint["port"] == "metrics"
    assert {"targetLabel": "job", "replacement": "streamer"} in endpoint["relabelings"]


def test_k8s_kustomization_lists_manifests():
    resources = set(load_yaml(K8S_DIR / "kustomization.yaml")["resources"])
    manifests = {path.name for path in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}

    assert resources == manifests


# Install script


def test_install_script_syntax():
    result = subprocess.run(["bash", "-n", str(REPO_ROOT / "scripts" / "install-prometheus.sh")], capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
