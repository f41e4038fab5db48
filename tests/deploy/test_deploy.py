"""The deployment kit under deploy/ and the image: manifests say what they must, promtool accepts the Prometheus
files and the alerts fire when they should, and alerts and dashboard read only the series the exporter serves."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest

from ray_jobs.metrics import RunMetrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dreamfleet.json"

DREAMFLEET_NAME = re.compile(r"dreamfleet_[a-z_]+")
HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")
# The only other series alerts and dashboard may read: the Pushgateway's own, and Ray's metrics export.
OTHER_NAMES = {"push_time_seconds", "ray_node_gpus_utilization", "ray_node_gram_used", "up"}
OTHER_NAME = re.compile(r"\b(?:push|ray)_[a-z_]+")

PANEL_TITLES = {
    "Fleet progress",
    "ETA",
    "Throughput per stage",
    "Training step time p50 / p95",
    "Seconds per image p50",
    "Failure rate by outcome",
    "VLM rows/s and error rate",
    "VLM batch seconds p95",
    "VLM output tokens/s",
    "VLM rows left",
    "Queue depth",
    "Workers alive",
    "Worker restarts",
    "Peak GPU memory",
    "GPU utilisation (Ray)",
    "Pack slots (used / total)",
    "Evaluated images/s by outcome",
    "Evaluation batch seconds p95",
    "Image scores p50 by metric",
}


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def one_of_kind(path: Path, kind: str) -> dict[str, Any]:
    [doc] = [d for d in documents(path) if d.get("kind") == kind]
    return doc


def container(template: dict[str, Any]) -> dict[str, Any]:
    return template["spec"]["containers"][0]


def ports(template: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container(template).get("ports", [])}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def alert_exprs() -> list[str]:
    return [rule["expr"] for group in documents(PROMETHEUS / "alerts.yml")[0]["groups"] for rule in group["rules"]]


def metric_base_names(text: str) -> set[str]:
    return {HISTOGRAM_SUFFIX.sub("", name) for name in DREAMFLEET_NAME.findall(text)}


def served_names() -> set[str]:
    """The base name of every series the driver serves, from the `# TYPE` lines of a fresh registry's exposition:
    what the exporter really has, so a series added there without its name in a list still counts."""
    text = generate_latest(RunMetrics().registry).decode()
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


# -- every manifest --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml")),
    ids=lambda p: str(p.relative_to(DEPLOY)),
)
def test_every_yaml_under_deploy_parses(path: Path):
    docs = documents(path)
    assert docs and all(isinstance(doc, dict) for doc in docs)


# -- KubeRay ---------------------------------------------------------------------------------------------------------


def assert_dreamfleet_cluster(spec: dict[str, Any]) -> None:
    """The cluster both manifests bring up: a CPU head that only schedules, autoscaled GPU workers, S3 from a Secret."""
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in str(container(head["template"]).get("resources"))
    [gpu] = spec["workerGroupSpecs"]
    assert 0 <= gpu["minReplicas"] <= gpu["maxReplicas"]
    resources = container(gpu["template"])["resources"]
    assert str(resources["requests"]["nvidia.com/gpu"]) == str(resources["limits"]["nvidia.com/gpu"]) == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["template"]["spec"][
        "tolerations"
    ]
    for template in (head["template"], gpu["template"]):
        assert container(template)["image"] == "dreamfleet:latest"
        assert ports(template)["metrics"] == 8080
        env = {e["name"]: e for e in container(template)["env"]}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "value" not in env[key]
            assert env[key]["valueFrom"]["secretKeyRef"]["key"] == key


def test_raycluster_has_a_cpu_head_and_autoscaled_gpu_workers():
    cluster = one_of_kind(KUBERAY / "raycluster.yaml", "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    assert_dreamfleet_cluster(cluster["spec"])


def test_rayjob_runs_the_fleet_and_cleans_up():
    job = one_of_kind(KUBERAY / "rayjob.yaml", "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1
    assert spec["entrypoint"].startswith("python -m ray_jobs run s3://")
    assert_dreamfleet_cluster(spec["rayClusterSpec"])


def test_rayjob_entrypoint_is_a_valid_run_command():
    """The entrypoint parses with the CLI's own parser, and asks for as many workers as the GPU group may hold."""
    from ray_jobs.cli import build_parser

    spec = one_of_kind(KUBERAY / "rayjob.yaml", "RayJob")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "ray_jobs"]
    args = build_parser().parse_args(argv[3:])
    assert (args.command, args.address, args.gpus_per_job) == ("run", "auto", 1)
    assert args.workers == spec["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"]
    assert args.base_model != "tiny" and args.vlm_model != "tiny"
    assert args.metrics_host == "0.0.0.0"
    assert args.pushgateway.startswith("http://")


def test_rayjob_driver_endpoint_is_served_where_the_podmonitor_looks():
    """`ray job submit` runs the driver on the head: its --metrics-port is a head port the driver PodMonitor selects."""
    spec = one_of_kind(KUBERAY / "rayjob.yaml", "RayJob")["spec"]
    argv = shlex.split(spec["entrypoint"])
    metrics_port = int(argv[argv.index("--metrics-port") + 1])
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]
    monitors = {m["metadata"]["name"]: m["spec"] for m in documents(PROMETHEUS / "podmonitors.yaml")}
    driver = monitors["dreamfleet-driver"]
    assert driver["selector"]["matchLabels"].items() <= head["metadata"]["labels"].items()
    [endpoint] = driver["podMetricsEndpoints"]
    assert ports(head)[endpoint["port"]] == metrics_port
    assert [e["port"] for e in monitors["ray"]["podMetricsEndpoints"]] == ["metrics"]


@pytest.mark.parametrize(
    "name, fields",
    [
        ("raycluster.yaml", ["num-cpus", "enableInTreeAutoscaling", "minReplicas", "maxReplicas", "tolerations"]),
        ("rayjob.yaml", ["num-cpus", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "backoffLimit"]),
    ],
)
def test_non_obvious_fields_are_commented(name: str, fields: list[str]):
    lines = (KUBERAY / name).read_text().splitlines()
    for field in fields:
        at = next(i for i, line in enumerate(lines) if line.lstrip().startswith(f"{field}:"))
        nearby = lines[max(0, at - 3) : at + 2]  # a comment on the line, just above, or opening its block
        assert any("#" in line for line in nearby), f"{name}: {field} has no comment saying why"


# -- Prometheus ------------------------------------------------------------------------------------------------------


@pytest.fixture
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:  # a failure, not a skip: a missing promtool would leave the deploy kit unchecked and CI green
        pytest.fail("promtool is not on PATH; .ci/run installs it with apt-get (Debian package prometheus)")
    return path


def run_promtool(promtool: str, *args: str) -> str:
    result = subprocess.run([promtool, *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_promtool_accepts_the_scrape_config(promtool: str):
    out = run_promtool(promtool, "check", "config", "deploy/prometheus/prometheus.yml")
    assert "1 rule files found" in out  # the config's rule_files reach alerts.yml


def test_promtool_accepts_the_alert_rules(promtool: str):
    run_promtool(promtool, "check", "rules", "deploy/prometheus/alerts.yml")


def test_alerts_fire_on_live_drivers_only(promtool: str):
    """tests/deploy/alerts_test.yml: each alert fires on a failing or stuck run, not on a healthy one, a fresh one
    or the Pushgateway's snapshot of a finished one."""
    run_promtool(promtool, "test", "rules", "tests/deploy/alerts_test.yml")


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path):
    rules = [{"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(dashboard_exprs())]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool(promtool, "check", "rules", str(path))


def test_alert_rules_cover_failures_stalls_vlm_errors_staleness_and_restarts():
    exprs = "\n".join(alert_exprs())
    assert 'dreamfleet_subject_attempts_total{instance!="", outcome!="success"}' in exprs
    assert 'state="failed"' in exprs
    assert "increase(dreamfleet_training_steps_total" in exprs and 'state="training"' in exprs
    assert "increase(dreamfleet_images_generated_total" in exprs and 'state="generating"' in exprs
    assert 'dreamfleet_vlm_rows_total{instance!="", outcome="error"}' in exprs and "> 0.05" in exprs
    assert 'time() - push_time_seconds{job="dreamfleet"} > 86400' in exprs
    assert "dreamfleet_worker_restarts_total" in exprs
    assert "dreamfleet_vlm_rows_left" in exprs and "increase(dreamfleet_vlm_rows_total" in exprs


def test_the_pushgateway_is_scraped_with_honor_labels():
    config = documents(PROMETHEUS / "prometheus.yml")[0]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["pushgateway"]["honor_labels"] is True
    assert jobs["dreamfleet"]["static_configs"][0]["targets"] == ["localhost:9101"]
    assert jobs["ray"]["static_configs"][0]["targets"] == ["localhost:8080"]
    assert config["rule_files"] == ["alerts.yml"]


# -- metric names ----------------------------------------------------------------------------------------------------


def test_alerts_use_only_exported_names():
    text = (PROMETHEUS / "alerts.yml").read_text()
    assert metric_base_names(text) <= served_names()
    assert set(OTHER_NAME.findall("\n".join(alert_exprs()))) <= OTHER_NAMES


def test_dashboard_reads_exactly_the_exported_names():
    exprs = "\n".join(dashboard_exprs())
    assert metric_base_names(exprs) == served_names()
    assert set(OTHER_NAME.findall(exprs)) <= OTHER_NAMES


# -- Grafana ---------------------------------------------------------------------------------------------------------


def test_dashboard_has_its_panels_and_a_prometheus_datasource_variable():
    board = dashboard()
    assert board["schemaVersion"] >= 36
    [variable] = [v for v in board["templating"]["list"] if v["name"] == "datasource"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert PANEL_TITLES <= {p["title"] for p in panels}
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


def test_dashboard_panels_query_what_their_titles_say():
    queries = {
        p["title"]: "\n".join(t["expr"] for t in p["targets"]) for p in dashboard()["panels"] if p["type"] != "row"
    }
    progress = next(p for p in dashboard()["panels"] if p["title"] == "Fleet progress")
    assert progress["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    assert "sum by (state) (dreamfleet_subjects" in queries["Fleet progress"]
    assert "clamp_min(sum(rate(dreamfleet_subject_attempts_total" in queries["ETA"]
    assert (
        "histogram_quantile(0.5, sum by (le) (rate(dreamfleet_training_step_seconds_bucket"
        in queries["Training step time p50 / p95"]
    )
    assert "histogram_quantile(0.95," in queries["Training step time p50 / p95"]
    assert (
        "histogram_quantile(0.5, sum by (le) (rate(dreamfleet_generation_image_seconds_bucket"
        in queries["Seconds per image p50"]
    )
    assert (
        "histogram_quantile(0.95, sum by (le, task) (rate(dreamfleet_vlm_batch_seconds_bucket"
        in queries["VLM batch seconds p95"]
    )
    assert 'outcome="error"' in queries["VLM rows/s and error rate"]
    assert "histogram_quantile(0.5, sum by (le, score) (rate(dreamfleet_eval_score_bucket" in queries[
        "Image scores p50 by metric"
    ]
    assert "ray_node_gpus_utilization" in queries["GPU utilisation (Ray)"]
    assert 'sum by (slots) (dreamfleet_pack_slots{instance!=""})' in queries["Pack slots (used / total)"]
    for title in ("Throughput per stage", "VLM output tokens/s"):
        assert "rate(" in queries[title]


# -- the image -------------------------------------------------------------------------------------------------------


def test_dockerfile_installs_cuda_torch_first_and_runs_the_cli_as_ray():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    assert "ARG BASE=rayproject/ray:2.60.0-py311-gpu" in lines
    text = "\n".join(lines)
    assert "rayproject/ray:2.60.0-py311-cpu" in text  # the CPU variant is documented
    assert text.index("pip install --no-cache-dir torch==") < text.index("pip install --no-cache-dir .")
    assert "USER ray" in lines and "USER root" not in lines
    assert "EXPOSE 9101" in lines
    assert lines[-1] == 'ENTRYPOINT ["python", "-m", "ray_jobs"]'
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".pytest_cache", "runs"} <= set(ignored)
