"""Offline checks of deploy/: no cluster, Docker engine or network needed, so they run in CI.

Manifests go against the schemas kubernetes-validate ships, plus the cross-references a schema
cannot see (selectors, ports, Secret/ConfigMap keys, drain timing); Prometheus files through
promtool; the dashboard may use only, and must cover all, metrics of gateway/metrics.py. With
no Docker engine or compose plugin here, the Dockerfile and compose file are checked by structure.
"""

from __future__ import annotations

import json
import posixpath
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from gateway.config.units import parse_duration, parse_size
from gateway.metrics import Metrics
from tests.support import files
from tests.support.gateway_proc import BackendProc, GatewayProc, start_gateway
from tests.support.procs import REPO, RedisServer, child_env
from tests.test_metrics import bearer, mint, new_key, observed_config, scrape, send, upload

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "upload-gateway.json"
CRD_KINDS = {"ServiceMonitor"}  # no schema ships for custom resources: checked by shape
# The oldest Kubernetes we support, and the newest schemas shipped.
K8S_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def manifests() -> dict[str, dict[str, Any]]:
    """Every Kubernetes manifest by kind (one document per file in deploy/kubernetes)."""
    docs = [load_yaml(p) for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"]
    return {doc["kind"]: doc for doc in docs}


def pod_spec() -> dict[str, Any]:
    return dict(manifests()["Deployment"]["spec"]["template"]["spec"])


def gateway_container() -> dict[str, Any]:
    (container,) = pod_spec()["containers"]
    return dict(container)


def configmap_policies() -> dict[str, Any]:
    return dict(yaml.safe_load(manifests()["ConfigMap"]["data"]["policies.yaml"]))


def k8s_quantity(value: str) -> int:
    """Binary-suffixed Kubernetes quantities (the only kind used here) in bytes."""
    units = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", value)
    assert match, value
    return int(match[1]) * units[match[2]]


def run_promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed (Debian package prometheus)"
    return subprocess.run([promtool, *map(str, args)], capture_output=True, text=True, timeout=30)


# --- Kubernetes ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("kind", sorted(set(manifests()) - CRD_KINDS))
def test_manifest_matches_the_kubernetes_schema(kind: str, version: str) -> None:
    kubernetes_validate.validate(manifests()[kind], version, strict=True)


def test_schema_validation_is_strict_about_unknown_fields() -> None:
    """Proves the check above can fail: a misspelt field must not pass silently."""
    deployment = manifests()["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpget": {}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_kustomization_lists_exactly_the_manifests_one_kind_each() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    assert "namespace" not in kustomization  # the caller chooses it
    assert len(files) == len(manifests())
    assert set(manifests()) == {
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "ServiceMonitor",
    }


def test_service_and_servicemonitor_reach_the_pods() -> None:
    kinds = manifests()
    pod_labels = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = kinds["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {p["name"]: p["containerPort"] for p in gateway_container()["ports"]}
    assert container_ports == {"http": 8080, "metrics": 9102}
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert {name: p["targetPort"] for name, p in service_ports.items()} == {
        "http": "http",
        "metrics": "metrics",
    }
    assert service_ports["http"]["port"] == 8080

    monitor = kinds["ServiceMonitor"]  # a CRD: no schema ships for it, so check its shape
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service_labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service_labels.items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in service_ports and endpoint["path"] == "/metrics"
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings"}

    annotations = kinds["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(container_ports["metrics"])


def test_autoscaler_and_disruption_budget_target_the_deployment() -> None:
    kinds = manifests()
    deployment = kinds["Deployment"]
    hpa = kinds["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert hpa["spec"]["minReplicas"] >= 2  # so the PDB can always evict one

    pdb = kinds["PodDisruptionBudget"]
    assert pdb["apiVersion"] == "policy/v1"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]


def test_probes_hit_the_admin_endpoints() -> None:
    container = gateway_container()
    probes = {
        name: container[name]["httpGet"]
        for name in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes["readinessProbe"] == {"path": "/readyz", "port": "metrics"}
    assert probes["livenessProbe"] == {"path": "/healthz", "port": "metrics"}
    assert probes["startupProbe"]["port"] == "metrics"
    # The probes reach the admin port from outside the pod only if it listens on all addresses.
    assert configmap_policies()["admin_listen"] == "0.0.0.0:9102"
    assert configmap_policies()["listen"] == "0.0.0.0:8080"


def test_pod_runs_non_root_with_a_read_only_root() -> None:
    container = gateway_container()
    assert pod_spec()["securityContext"]["runAsNonRoot"] is True
    assert pod_spec()["securityContext"]["runAsUser"] != 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    resources = container["resources"]
    mebi = {k: int(v["memory"].removesuffix("Mi")) for k, v in resources.items()}
    assert mebi["requests"] <= mebi["limits"]
    # Each worker may reach the 150 MiB ceiling at once: the limit must hold them all.
    workers = int(container["args"][container["args"].index("--workers") + 1])
    assert mebi["limits"] >= workers * 150 + 64, "memory limit below workers x 150 MiB + parent"
    cpu = {
        k: float(v["cpu"].removesuffix("m")) / (1000 if v["cpu"].endswith("m") else 1)
        for k, v in resources.items()
    }
    assert cpu["requests"] <= cpu["limits"] and cpu["limits"] >= workers


def test_config_and_signing_key_come_from_the_configmap_and_secret() -> None:
    kinds = manifests()
    container = gateway_container()
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}

    config_arg = container["args"][container["args"].index("--config") + 1]
    config_mount = mounts[str(Path(config_arg).parent)]
    assert config_mount["readOnly"] is True
    config_volume = volumes[config_mount["name"]]["configMap"]
    assert config_volume["name"] == kinds["ConfigMap"]["metadata"]["name"]
    assert Path(config_arg).name in kinds["ConfigMap"]["data"]

    (env,) = [e for e in container["env"] if e["name"] == "GATEWAY_SIGNING_KEY"]
    ref = env["valueFrom"]["secretKeyRef"]
    secret = kinds["Secret"]
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]
    key_source = configmap_policies()["auth"]["keys"]["default"]
    assert key_source == {"secret_env": "GATEWAY_SIGNING_KEY"}


def test_spool_is_a_writable_volume_big_enough_for_the_configured_spool() -> None:
    spool = configmap_policies()["spool"]
    mounts = {m["mountPath"]: m["name"] for m in gateway_container()["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    empty_dir = volumes[mounts[spool["dir"]]]["emptyDir"]
    assert "medium" not in empty_dir  # disk, not RAM: the spool holds what RAM should not
    # spool.max_bytes bounds the spools of one process: every worker may fill its own.
    args = gateway_container()["args"]
    workers = int(args[args.index("--workers") + 1])
    assert k8s_quantity(empty_dir["sizeLimit"]) >= workers * parse_size(spool["max_bytes"])
    assert "/tmp" in mounts  # prometheus_client multiprocess files with --workers


def test_termination_grace_covers_prestop_and_drain() -> None:
    spec = pod_spec()
    grace = spec["terminationGracePeriodSeconds"]
    assert grace == 45
    pre_stop = gateway_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = parse_duration(configmap_policies()["server"]["shutdown_grace"])
    assert grace > int(pre_stop[1]) + drain


def test_configmap_policy_passes_check_config(tmp_path: Path) -> None:
    policy = tmp_path / "policies.yaml"
    policy.write_text(manifests()["ConfigMap"]["data"]["policies.yaml"])
    env = child_env(GATEWAY_SIGNING_KEY="x" * 32)
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(policy)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- Prometheus ---------------------------------------------------------------------------


def test_promtool_accepts_the_scrape_config_and_its_rule_file() -> None:
    result = run_promtool("check", "config", PROM / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    result = run_promtool("test", "rules", PROM / "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = {r["alert"] for g in load_yaml(PROM / "alerts.yml")["groups"] for r in g["rules"]}
    tested = {
        t["alertname"]
        for case in load_yaml(PROM / "alerts_test.yml")["tests"]
        for t in case["alert_rule_test"]
    }
    assert alerts == tested


# --- metric references (dashboard and alerts) ---------------------------------------------


def defined_metrics() -> dict[str, set[str]]:
    """Every series name the gateway can export, mapped to the labels it may carry."""
    metrics = Metrics()
    labels = {
        c._name: set(c._labelnames)
        for c in vars(metrics).values()
        if isinstance(c, MetricWrapperBase)
    }
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}
    names: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for suffix in suffixes[family.type]:
            extra = {"le"} if suffix == "_bucket" else set()
            names[family.name + suffix] = labels[family.name] | extra | TARGET_LABELS
    assert len(names) > 20, "Metrics() registered nothing (PROMETHEUS_MULTIPROC_DIR set?)"
    return names


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    # A collapsed row holds its panels inside itself.
    panels = [q for p in dashboard["panels"] for q in [p, *p.get("panels", [])]]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def variable_queries() -> list[str]:
    """The dashboard variables' PromQL (label_values(metric, label))."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]


def check_references(expr: str, defined: dict[str, set[str]]) -> set[str]:
    """Asserts expr names only defined metrics and their labels; returns the metrics it names."""
    used = set(re.findall(r"\bupload_gateway_\w+", expr))
    assert used, f"no gateway metric in {expr!r}"
    unknown = used - defined.keys()
    assert not unknown, f"{expr!r} uses undefined metrics {unknown}"
    allowed = set().union(*(defined[m] for m in used))
    grouped = [
        n.strip()
        for g in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
        for n in g.split(",")
        if n.strip()
    ]
    matched = re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", expr)
    assert set(grouped + matched) <= allowed, f"{expr!r} uses labels outside {allowed}"
    return used


def test_dashboard_uses_only_defined_metrics_and_covers_all_of_them() -> None:
    defined = defined_metrics()
    used = set().union(*(check_references(e, defined) for e in dashboard_exprs()))
    families = {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in defined}
    covered = {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in used}
    assert covered == families, f"metrics without a panel: {families - covered}"
    assert any("histogram_quantile" in e and "request_duration" in e for e in dashboard_exprs())
    assert any("histogram_quantile" in e and "backend_duration" in e for e in dashboard_exprs())


def test_reference_check_catches_unknown_metrics_and_labels() -> None:
    defined = defined_metrics()
    with pytest.raises(AssertionError, match="undefined metrics"):
        check_references("rate(upload_gateway_uploads_bytes_total[5m])", defined)
    with pytest.raises(AssertionError, match="labels outside"):
        check_references("sum by (path) (rate(upload_gateway_requests_total[5m]))", defined)


def test_the_metric_checks_read_every_dashboard_and_rule_file_shipped() -> None:
    """The reference checks read ``DASHBOARD`` and ``alerts.yml`` by name: a second dashboard or
    rule file would ship with its metric names unchecked. Adding one must extend them."""
    assert sorted(DASHBOARD.parent.glob("*")) == [DASHBOARD]
    assert load_yaml(PROM / "prometheus.yml")["rule_files"] == ["alerts.yml"]
    assert {p.name for p in PROM.iterdir()} == {"prometheus.yml", "alerts.yml", "alerts_test.yml"}
    assert not [p for p in K8S.glob("*.yaml") if "PrometheusRule" in p.read_text()]


def test_alert_rules_use_only_defined_metrics() -> None:
    defined = defined_metrics()
    for group in load_yaml(PROM / "alerts.yml")["groups"]:
        for rule in group["rules"]:
            if rule["expr"].startswith("up{"):
                continue  # Prometheus's own per-target series
            check_references(rule["expr"], defined)


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query as a recording rule, Grafana variables replaced."""
    variables = {"$__rate_interval": "5m", "$__range": "1h", "$job": ".*", "$channel": ".*"}
    rules = []
    for index, expr in enumerate(dashboard_exprs()):
        for name, value in variables.items():
            expr = expr.replace(name, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_panels_are_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in panels)
    # The $datasource variable lets the JSON import into any Grafana, not only the compose one.
    assert all(p["datasource"]["uid"] == "${datasource}" for p in panels if p["type"] != "row")
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "channel"} <= variables


# --- compose and Grafana provisioning -----------------------------------------------------


def test_compose_stack_is_complete_and_wired() -> None:
    compose = load_yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert set(services) == {"redis", "gateway", "sample-backend", "prometheus", "grafana"}
    for name in ("gateway", "sample-backend"):
        build = services[name]["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"compose mounts missing {source}"
            else:
                assert source in compose["volumes"], f"undeclared volume {source}"

    gateway = services["gateway"]
    env = gateway["environment"]
    assert env["GATEWAY_REDIS_URL"] == "redis://redis:6379/0"
    assert env["GATEWAY_BACKEND_URL"] == "http://sample-backend:8081"
    assert "--listen" in services["sample-backend"]["command"]
    assert env["GATEWAY_SIGNING_KEY"].startswith("${GATEWAY_SIGNING_KEY")  # never a literal key
    assert parse_duration(gateway["stop_grace_period"]) > 30

    scrape = load_yaml(PROM / "prometheus.yml")["scrape_configs"]
    targets = [t for job in scrape for c in job["static_configs"] for t in c["targets"]]
    admin_port = env["GATEWAY_ADMIN_LISTEN"].rsplit(":", 1)[1]
    assert targets == [f"gateway:{admin_port}"]


def compose_gateway_mounts() -> dict[str, str]:
    """The compose gateway's mounts: container path -> source (relative paths are host paths)."""
    gateway = load_yaml(DEPLOY / "compose.yaml")["services"]["gateway"]
    return {target: source for source, target, *_ in (v.split(":") for v in gateway["volumes"])}


def compose_gateway_config() -> tuple[str, dict[str, Any]]:
    """The path the compose gateway reads its policy from, and the policy found there."""
    command = load_yaml(DEPLOY / "compose.yaml")["services"]["gateway"]["command"]
    config_path = command[command.index("--config") + 1]
    for target, source in compose_gateway_mounts().items():
        if config_path == target or config_path.startswith(target + "/"):
            host = DEPLOY / source / posixpath.relpath(config_path, target)
            return config_path, dict(load_yaml(host.resolve()))
    raise AssertionError(f"{config_path} is not mounted into the compose gateway")


def test_compose_gateway_spools_on_a_volume_the_image_prepares() -> None:
    """The root filesystem is read-only: a spool.dir off the spool volume answers 507 to every
    upload that does not fit in memory. A relative spool.dir resolves against the working
    directory; a named volume takes its owner from the image's directory at that path."""
    gateway = load_yaml(DEPLOY / "compose.yaml")["services"]["gateway"]
    assert gateway["read_only"] is True
    runtime = dockerfile_stages()[-1]
    workdir = gateway.get("working_dir", dict(runtime)["WORKDIR"])
    _, policy = compose_gateway_config()
    spool = posixpath.normpath(posixpath.join(workdir, policy["spool"]["dir"]))
    volumes = {t for t, s in compose_gateway_mounts().items() if not s.startswith(".")}
    (target,) = [t for t in volumes if spool == t or spool.startswith(t + "/")] or [None]
    assert target, f"spool.dir {spool} is on the read-only root, not on one of {volumes}"
    runs = " ".join(a for k, a in runtime if k == "RUN")
    user = dict(runtime)["USER"].split(":")[0]
    assert re.search(rf"mkdir -p [^&]*{re.escape(target)}(\s|$)", runs), target
    assert re.search(rf"chown [^&]*{re.escape(target)}(\s|$)", runs), target
    assert f"--uid {user}" in runs


def test_compose_gateway_sees_edits_of_its_policy_file() -> None:
    """The compose file promises a hot reload on edit. A bind-mounted *file* keeps the inode
    it was started with, so an editor that saves by replacing the file (vim, sed -i, most
    IDEs) is never seen: the policy's directory must be mounted instead."""
    config_path, _ = compose_gateway_config()
    mounts = compose_gateway_mounts()
    assert config_path not in mounts, f"{config_path} is bind-mounted as a single file"
    assert (DEPLOY / mounts[posixpath.dirname(config_path)]).is_dir()


def test_grafana_provisioning_matches_the_compose_mounts() -> None:
    grafana = load_yaml(DEPLOY / "compose.yaml")["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    provisioning = DEPLOY / "grafana" / "provisioning"
    (datasource,) = load_yaml(provisioning / "datasources" / "prometheus.yaml")["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    (provider,) = load_yaml(provisioning / "dashboards" / "upload-gateway.yaml")["providers"]
    assert provider["options"]["path"] == mounts["./grafana/dashboards"]


# --- Dockerfile ---------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Instructions (keyword, arguments) per build stage, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword.upper(), args.strip()))
    return stages


def test_dockerfile_builds_a_wheel_then_a_slim_non_root_image() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    builder, runtime = dockerfile_stages()
    assert builder[0] == ("FROM", "${PYTHON_IMAGE} AS builder")
    assert any(k == "RUN" and "pip wheel" in a for k, a in builder)
    final = dict(runtime)  # the last value of each keyword wins, as in Docker
    runs = " ".join(a for k, a in runtime if k == "RUN")
    assert "libmagic1" in runs  # python-magic sniffs with it
    assert "from=builder" in runs and "pip install --no-index" in runs
    user = final["USER"].split(":")[0]
    assert user not in {"root", "0"} and f"--uid {user}" in runs
    assert user == str(pod_spec()["securityContext"]["runAsUser"])
    assert final["EXPOSE"].split() == ["8080", "9102"]
    assert "urllib" in final["HEALTHCHECK"] and "127.0.0.1:9102/healthz" in final["HEALTHCHECK"]
    assert json.loads(final["ENTRYPOINT"]) == ["upload-gateway"]  # exec form: gets SIGTERM
    assert json.loads(final["CMD"])[0] == "serve"


def test_dockerfile_copies_only_existing_files_the_ignore_file_lets_through() -> None:
    ignore = [
        line
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert ignore[0] == "**"  # everything out, then only what the build needs back in
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copies = [a.split() for stage in dockerfile_stages() for k, a in stage if k == "COPY"]
    sources = [src for args in copies if not args[0].startswith("--") for src in args[:-1]]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"COPY source {source} missing from the repository"
        assert any(source == a or source.startswith(a + "/") for a in allowed), source


# --- the metrics a deployed gateway really exports ----------------------------------------

# Counted only on faults this module does not cause (Redis or the backend failing); their
# names and labels are checked against gateway/metrics.py above.
FAULT_ONLY = {"upload_gateway_backend_errors_total", "upload_gateway_redis_errors_total"}


def exported(text: str) -> dict[str, set[str]]:
    """Every series name of a scrape, mapped to the labels it carries."""
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


@pytest.fixture(scope="module")
def deployed(
    redis_server: RedisServer, backend_proc: BackendProc, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProc, str]]:
    """A gateway run as the Deployment and compose run it (--workers 2: prometheus_client's
    multiprocess mode), and its first scrape, before any request."""
    tmp = tmp_path_factory.mktemp("deployed")
    config = observed_config(redis_server, backend_proc, tmp, "ugw-deployed")
    config["channels"]["trial"] = {
        "mode": "report",
        "agents": {"enabled": True, "allowed_types": ["images"]},
    }
    gw = start_gateway(config, tmp, workers=2)
    try:
        yield gw, scrape(gw)
    finally:
        gw.stop()


def test_a_fresh_gateway_exports_the_reload_failures_its_alert_watches(
    deployed: tuple[GatewayProc, str],
) -> None:
    """UploadGatewayConfigReloadFailed is an increase() of the failure series, and Prometheus
    sees no increase in a series born at 1: unless it is exported at 0 from the start, the
    first failed reload of a process never alerts (alerts_test.yml starts it at 0 too)."""
    _, fresh = deployed
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(fresh)
        for s in family.samples
    }
    for result in ("success", "failure"):
        key = ("upload_gateway_config_reloads_total", (("result", result),))
        assert samples.get(key) == 0.0, f"{key} not exported at 0 before the first reload"


def test_dashboard_and_alerts_query_series_as_a_running_gateway_exports_them(
    deployed: tuple[GatewayProc, str],
) -> None:
    gw, _ = deployed
    agent = bearer(mint(gw, new_key(gw, "deployed-client"), "role=agent"))
    png, headers = upload("photo.png", "image/png", files.png())
    big, big_headers = upload("big.png", "image/png", files.make("png", 200_000))
    exe, exe_headers = upload("tool.exe", "application/octet-stream", files.pe())
    pdf, pdf_headers = upload("doc.pdf", "application/pdf", files.pdf())
    for path, body, extra, status in [
        ("/streams/1/objects", png, headers, 200),
        ("/streams/1/objects", big, big_headers, 200),  # past memory_threshold: a spill
        ("/streams/1/objects", exe, exe_headers, 415),
        ("/streams/trial/objects", pdf, pdf_headers, 200),  # mode: report would refuse it
    ]:
        assert send(gw.port, "POST", path, body, {**extra, **agent}).status == status
    assert send(gw.port, "GET", "/plain", headers=agent).status == 200
    assert send(gw.port, "GET", "/plain", headers=bearer("not-a-jwt")).status == 401
    names = exported(scrape(gw))

    alerts = [r["expr"] for g in load_yaml(PROM / "alerts.yml")["groups"] for r in g["rules"]]
    for expr in dashboard_exprs() + variable_queries() + alerts:
        used = set(re.findall(r"\bupload_gateway_\w+", expr))
        missing = used - names.keys() - FAULT_ONLY
        assert not missing, f"{expr!r}: {missing} not exported by a running gateway"
        carried = set().union(*(names.get(m, set()) for m in used)) | TARGET_LABELS
        for name, selector in re.findall(r"\b(upload_gateway_\w+)\s*\{([^}]*)\}", expr):
            matched = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector))
            unknown = matched - names.get(name, matched) - TARGET_LABELS
            assert not unknown, f"{expr!r}: {name} carries no {unknown}"
        grouped = {
            n.strip()
            for g in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
            for n in g.split(",")
            if n.strip()
        }
        if not used & FAULT_ONLY:
            assert grouped <= carried, f"{expr!r} groups by labels outside {carried}"
        for label in re.findall(r"label_values\(\w+,\s*(\w+)\)", expr):
            assert label in carried, expr
