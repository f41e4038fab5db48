"""Security: user-given names stay inside RUN, no pickle or remote code ever runs, secrets never leak, loopback metrics."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from engine import storage
from engine.settings import load_settings
from ray_jobs.cli import build_parser, main
from ray_jobs.metrics import RunMetrics
from ray_jobs.state.manifest import write_subjects_manifest
from ray_jobs.state.run_dir import RunDirectory
from tests.helpers.services import ACCESS_KEY_ID, SECRET_ACCESS_KEY, free_port
from tests.helpers.subjects import make_subject_rows

FAST = ["--set", "max_train_steps=4", "--set", "checkpointing_steps=2", "--set", "num_class_images=2", "--no-progress",
        "--set", "evaluate=false"]  # the evaluation pass has its own tests (test_evaluate.py); here it only costs time


def _tree(root: Path, skip: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if skip not in p.parents and p != skip}


@pytest.mark.slow
def test_names_from_the_manifest_never_reach_outside_run(ray_cluster, tmp_path):
    rows = make_subject_rows(tmp_path / "images", 1)
    rows[0]["class_prompt"] = "../../../escaped/$(touch pwned) a photo of a ball"  # names its class-image folder
    hostile = ["../escaped", "..", "/tmp/absolute", "s0/../../escaped", "C:\\windows", "~root"]
    rows += [{**rows[0], "subject_id": sid} for sid in hostile]
    manifest, run = str(tmp_path / "subjects.parquet"), tmp_path / "work" / "run"
    write_subjects_manifest(manifest, rows)
    run.parent.mkdir()
    before = _tree(tmp_path, run)

    assert main(["train", manifest, "--out", str(run), *FAST]) == 1
    assert _tree(tmp_path, run) == before  # nothing new anywhere but RUN
    rejected = {r["subject_id"]: r["reason"] for r in RunDirectory(str(run)).read_rejected_rows()}
    assert set(rejected) == set(hostile) and all("subject_id" in reason for reason in rejected.values())
    assert [p.name for p in (run / "subjects").iterdir()] == ["s0"]
    assert [p.name.rsplit("-", 1)[0] for p in (run / "class_images").iterdir()] == ["escaped-touch-pwned-a-photo-of-a-ball"]


@pytest.mark.slow
def test_a_link_in_run_that_leads_outside_is_refused(ray_cluster, tmp_path, capsys):
    manifest, run, outside = str(tmp_path / "m.parquet"), tmp_path / "run", tmp_path / "outside"
    write_subjects_manifest(manifest, make_subject_rows(tmp_path / "images", 1))
    outside.mkdir()
    (run / "subjects").mkdir(parents=True)
    (run / "subjects" / "s0").symlink_to(outside)

    assert main(["train", manifest, "--out", str(run), *FAST]) == 2
    assert f"{run}/subjects/s0 is a link to {outside}, outside the run directory" in capsys.readouterr().err
    assert not list(outside.iterdir()) and not (run / "run.json").exists()

    # A link that stays inside RUN is harmless and allowed.
    (run / "subjects" / "s0").unlink()
    (run / "subjects" / "s0").mkdir()
    (run / "latest").symlink_to(run / "subjects")
    assert main(["train", manifest, "--out", str(run), *FAST]) == 0


def test_remote_code_in_a_model_directory_runs_only_when_trusted(tmp_path):
    from engine.vlm.chat import resolve_vlm
    from engine.vlm.model import VLM

    model, marker = tmp_path / "vlm", tmp_path / "REMOTE-CODE-RAN"
    shutil.copytree(resolve_vlm("tiny"), model)
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageTextToText": "evil.Model", "AutoConfig": "evil.Config"}
    (model / "config.json").write_text(json.dumps(config))

    VLM(str(model), load_settings("tiny"))  # the stock Qwen3-VL classes load it; evil.py is never imported
    assert not marker.exists()
    with pytest.raises(Exception):  # noqa: B017 - evil.py defines no model; what matters is that it ran
        VLM(str(model), load_settings("tiny", overrides={"trust_remote_code": True}))
    assert marker.exists()  # the same directory with the user's explicit consent: the payload was real


def test_metrics_listen_on_loopback_unless_told_otherwise():
    args = build_parser().parse_args(["run", "m.parquet", "--out", "run", "--metrics-port", "9"])
    assert args.metrics_host == "127.0.0.1"
    metrics = RunMetrics().serve(0)
    try:
        port = metrics._server.server_address[1]
        listening = [c for c in psutil.Process().net_connections("inet") if c.laddr.port == port]
        assert [c.laddr.ip for c in listening] == ["127.0.0.1"]
    finally:
        metrics.stop()


@pytest.mark.slow
def test_s3_credentials_never_appear_in_run_logs_or_metrics(ray_cluster, tmp_path, capsys):
    import s3fs

    s3fs.S3FileSystem().mkdir("dreamfleet-secrets")
    rows = make_subject_rows(tmp_path / "images", 2)
    for row in rows:
        row["prompts"] = ["a photo of sks thing"]
    manifest, run = str(tmp_path / "m.parquet"), "s3://dreamfleet-secrets/run"
    write_subjects_manifest(manifest, rows)
    port = free_port()
    scrapes: list[str] = []
    finished = threading.Event()

    def scrape() -> None:
        while not finished.is_set():
            try:
                scrapes.append(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode())
            except OSError:
                pass
            time.sleep(0.5)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        code = main(["run", manifest, "--out", run, *FAST, "--set", "num_images_per_prompt=1",
                     "--metrics-port", str(port)])  # fmt: skip
    finally:
        finished.set()
        scraper.join()
    assert code == 0 and scrapes

    fs, root = storage.filesystem(run)
    texts = {f"s3://{path}": fs.cat_file(path).decode("latin-1") for path in fs.find(root)}
    assert any(uri.endswith("run.json") for uri in texts) and any(uri.endswith("status.json") for uri in texts)
    console = capsys.readouterr()
    texts.update(stdout=console.out, stderr=console.err, metrics="\n".join(scrapes))
    for log in Path("/tmp/ray/session_latest/logs").rglob("*"):
        if log.is_file():
            texts[str(log)] = log.read_bytes().decode("latin-1")
    leaks = [name for name, text in texts.items() if SECRET_ACCESS_KEY in text or ACCESS_KEY_ID in text]
    assert not leaks

