"""Metrics against the real servers from Debian: Prometheus scrapes a running `dreamfleet run` on loopback, and the
Pushgateway holds the final values after it exits. CI installs both (see .ci/run)."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ray_jobs.cli import main
from ray_jobs.metrics import EXPORTED_NAMES
from ray_jobs.state.manifest import write_subjects_manifest
from tests.helpers.services import free_port
from tests.helpers.subjects import make_subject_rows

STEPS = 12


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def _wait_ready(url: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            _get(url)
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(url)


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; .ci/run installs it with apt-get")
    return path


@pytest.fixture
def servers(tmp_path):
    """A Pushgateway and a Prometheus scraping it and the driver's future metrics port, every second."""
    driver_port, gateway_port, prometheus_port = free_port(), free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - {{job_name: driver, static_configs: [{{targets: ['127.0.0.1:{driver_port}']}}]}}\n"
        f"  - {{job_name: pushgateway, honor_labels: true, static_configs: [{{targets: ['127.0.0.1:{gateway_port}']}}]}}\n"
    )
    processes = [
        subprocess.Popen([_binary("prometheus-pushgateway"), f"--web.listen-address=127.0.0.1:{gateway_port}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([_binary("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                          f"--web.listen-address=127.0.0.1:{prometheus_port}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]  # fmt: skip
    try:
        _wait_ready(f"http://127.0.0.1:{gateway_port}/-/ready")
        _wait_ready(f"http://127.0.0.1:{prometheus_port}/-/ready")
        # A server that lost its port to another process has exited; never talk to whoever holds the port.
        assert all(p.poll() is None for p in processes), "prometheus or pushgateway exited: port taken?"
        yield {"driver": driver_port, "gateway": f"http://127.0.0.1:{gateway_port}",
               "prometheus": f"http://127.0.0.1:{prometheus_port}"}  # fmt: skip
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)


def _query(prometheus: str, promql: str) -> list[dict]:
    url = f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    return json.loads(_get(url))["data"]["result"]


def _value(prometheus: str, promql: str, timeout: float = 30) -> float:
    deadline = time.time() + timeout
    while time.time() < deadline:
        result = _query(prometheus, promql)
        if result:
            return float(result[0]["value"][1])
        time.sleep(0.5)
    raise AssertionError(f"no series for {promql}")


def test_prometheus_scrapes_the_run_and_the_pushgateway_keeps_its_final_values(ray_cluster, servers, tmp_path):
    rows = make_subject_rows(tmp_path / "images", 2)
    for row in rows:
        row["prompts"] = ["a photo of sks thing on a table", "a photo of sks thing at night"]
    manifest, run = str(tmp_path / "subjects.parquet"), str(tmp_path / "run")
    write_subjects_manifest(manifest, rows)
    args = ["run", manifest, "--out", run, "--workers", "2", "--no-progress", "--metrics-port", str(servers["driver"]),
            "--pushgateway", servers["gateway"], "--set", f"max_train_steps={STEPS}", "--set", "num_class_images=2",
            "--set", "num_images_per_prompt=2"]  # fmt: skip
    result = {}
    driver = threading.Thread(target=lambda: result.setdefault("code", main(args)))
    driver.start()
    # While it runs, Prometheus scrapes the driver's endpoint on loopback. The series exist at 0 from the first
    # scrape, before the scheduler's first tick counts the 2 subjects: wait for the count, while the driver runs.
    live, deadline = 0.0, time.time() + 300
    while live != 2 and driver.is_alive() and time.time() < deadline:
        live = _value(servers["prometheus"], 'sum(dreamfleet_subjects{job="driver"})', timeout=300)
        time.sleep(0.2)
    assert live == 2
    driver.join(timeout=900)
    assert result["code"] == 0

    # After it exits, the final values sit in the Pushgateway, and Prometheus scrapes them from there.
    images = pq.read_table(Path(run) / "generations.parquet").num_rows
    final = {
        'dreamfleet_subjects{job="dreamfleet", state="done"}': 2,
        'dreamfleet_images_generated_total{job="dreamfleet"}': images,
        'dreamfleet_training_steps_total{job="dreamfleet"}': 2 * STEPS,
        'dreamfleet_class_images_generated_total{job="dreamfleet"}': 4,  # two class prompts, two images each
        'sum(dreamfleet_subject_attempts_total{job="dreamfleet", outcome="success"})': 4,  # train + generate each
        'sum(dreamfleet_vlm_rows_total{job="dreamfleet", task="moderate"})': images,  # the moderation pass
        'dreamfleet_eval_images_total{job="dreamfleet", outcome="ok"}': images,  # the evaluation pass
        'dreamfleet_eval_score_count{job="dreamfleet", score="clip_t"}': images,
        'dreamfleet_training_step_seconds_count{job="dreamfleet"}': 2 * STEPS,
    }
    for promql, expected in final.items():
        assert _value(servers["prometheus"], promql) == expected, promql
    assert images == 8

    # Every name the dashboard and alerts may use is really exported (a live scrape of the Pushgateway).
    scraped = _get(f"{servers['gateway']}/metrics")
    for name in EXPORTED_NAMES:
        assert f"\n{name}" in scraped or f"\n{name}_count" in scraped, name


def test_a_vlm_pass_is_visible_while_it_runs_and_every_series_is_zero_from_the_start(ray_cluster, servers, tmp_path):
    import pyarrow as pa
    from PIL import Image

    docs = tmp_path / "docs"
    docs.mkdir()
    for k in range(4):
        rows = []
        for i in range(6):
            path = tmp_path / f"{k}-{i}.png"
            Image.new("RGB", (48, 40), (40 * k, 30 * i, 120)).save(path)
            rows.append({"id": f"{k}-{i}", "image": str(path)})
        pq.write_table(pa.Table.from_pylist(rows), docs / f"part-{k}.parquet")
    args = ["analyze", str(docs), "--task", "caption", "--out", str(tmp_path / "captions.parquet"), "--no-progress",
            "--metrics-port", str(servers["driver"]), "--set", "vlm_batch_size=1"]  # fmt: skip
    result = {}
    driver = threading.Thread(target=lambda: result.setdefault("code", main(args)))
    driver.start()
    prometheus = servers["prometheus"]
    # From the first scrape, before any row: every labelled series exists at 0, those of other tasks too.
    assert _value(prometheus, 'dreamfleet_vlm_rows_total{job="driver", task="ocr", outcome="error"}', 120) == 0
    assert _value(prometheus, 'dreamfleet_subjects{job="driver", state="failed"}') == 0
    assert _value(prometheus, 'dreamfleet_subject_attempts_total{job="driver", stage="train", outcome="oom"}') == 0

    # While the pass runs, rows answered by the model actor show up: nothing reaches the driver but their figures.
    seen_live = None
    deadline = time.time() + 300
    while driver.is_alive() and time.time() < deadline:
        rows = _query(prometheus, 'sum(dreamfleet_vlm_rows_total{job="driver", task="caption"})')
        left = _query(prometheus, 'dreamfleet_vlm_rows_left{job="driver", task="caption"}')
        if rows and left and 0 < float(rows[0]["value"][1]) and float(left[0]["value"][1]) > 0:
            seen_live = (float(rows[0]["value"][1]), float(left[0]["value"][1]))
            break
        time.sleep(0.3)
    assert seen_live is not None and driver.is_alive(), "no VLM rows were visible while the pass ran"
    assert seen_live[0] + seen_live[1] <= 24  # answered + left: the 24 rows of the pass
    driver.join(timeout=600)
    assert result["code"] == 0
