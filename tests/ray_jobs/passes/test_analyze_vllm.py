"""`dreamfleet analyze --set vlm_engine=vllm` end to end in the vLLM rig (make test-vllm): images, PDF pages and a
video through Ray Data into vLLM model actors; bad rows; live metrics; a model actor killed mid-pass and replaced;
a rerun that answers only new ids."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import psutil
import pyarrow.parquet as pq
import pytest

from ray_jobs.cli import main
from tests.ray_jobs.passes.test_analyze_media import _manifest, _pages

pytestmark = pytest.mark.vllm

# torch.compile costs about a minute per engine start on two CPU cores and gains nothing on the tiny models.
VLLM = ["--set", "vlm_engine=vllm", "--set", "vlm_engine_args={enforce_eager: true}", "--no-progress"]


def _busy_model_actors() -> list[psutil.Process]:
    """The pass's model actor while it answers a batch (Ray titles it ray::MapWorker(MapBatches(VLMPredictor)).<method>;
    vLLM's engine processes are its children, titled by vLLM)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        title = (process.info["cmdline"] or [""])[0]
        method = title.split("VLMPredictor")[-1] if title.startswith("ray::") and "VLMPredictor" in title else ""
        if "." in method and not method.endswith((".__init__", ".identity")):  # loaded, and in a call
            found.append(process)
    return found


class Watcher(threading.Thread):
    """Kills the model actor once, at its first batch, and scrapes the driver's metrics while the pass runs."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port, self.stop, self.killed, self.scrapes = port, threading.Event(), 0, []

    def run(self) -> None:
        while not self.stop.is_set():
            busy = _busy_model_actors()
            if busy and not self.killed:
                busy[0].kill()
                self.killed += 1
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as response:
                    self.scrapes.append(response.read().decode())
            except OSError:
                pass
            time.sleep(0.2)


def _value(scrape: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} (\S+)$", scrape, re.M)
    return float(match.group(1)) if match else 0.0


def test_every_input_kind_on_vllm_survives_a_killed_actor_with_live_metrics(vllm_cluster, tmp_path):
    from tests.helpers.services import free_port

    manifest, pages, bad = _manifest(tmp_path / "in", categories=False)
    out, port = tmp_path / "caption.parquet", free_port()
    watcher = Watcher(port)
    watcher.start()
    try:
        code = main(["analyze", manifest, "--task", "caption", "--out", str(out), "--metrics-port", str(port),
                     "--set", "vlm_rows_per_file=3", *VLLM])  # fmt: skip
    finally:
        watcher.stop.set()
        watcher.join()
    assert code == 1  # the bad rows
    assert watcher.killed == 1  # the actor died mid-batch; Ray Data replaced it and redid that batch
    table = pq.read_table(out)
    assert _pages(table) == {**pages, **{rid: [None] for rid in bad}}  # every page once, every bad row once
    rows = {(r["id"], r["page"]): r for r in table.to_pylist()}
    for rid, fragment in bad.items():
        assert fragment in rows[(rid, None)]["error"]
    answered = [r for r in rows.values() if r["id"] in pages]
    assert all(r["error"] is None and r["caption"] is not None and r["num_output_tokens"] > 0 for r in answered)
    live = [s for s in watcher.scrapes if _value(s, 'dreamfleet_vlm_rows_total{outcome="ok",task="caption"}') > 0]
    assert live, "no scrape saw answered rows while the pass ran"
    assert _value(live[-1], 'dreamfleet_vlm_output_tokens_total{task="caption"}') > 0
    assert all(_value(s, 'dreamfleet_vlm_tokens_per_second{task="caption"}') > 0 for s in live)  # the engine's rate


def test_a_rerun_on_vllm_answers_only_new_ids(vllm_cluster, tmp_path):
    import pyarrow as pa

    from tests.ray_jobs.passes.test_analyze import _png

    folder = tmp_path / "docs"
    folder.mkdir()
    rows = [{"id": f"r{i}", "image_bytes": _png(colour)} for i, colour in enumerate(["red", "white", "blue", "grey"])]
    schema = pa.schema([("id", pa.string()), ("image_bytes", pa.binary())])
    pq.write_table(pa.Table.from_pylist(rows[:2], schema=schema), folder / "part-0.parquet")
    out = tmp_path / "moderate.parquet"
    args = ["analyze", str(folder), "--task", "moderate", "--out", str(out), *VLLM]
    assert main(args) == 0
    first = {f.name: f.read_bytes() for f in out.glob("*.parquet")}
    pq.write_table(pa.Table.from_pylist(rows[2:], schema=schema), folder / "part-1.parquet")
    assert main(args) == 0
    assert all((out / name).read_bytes() == data for name, data in first.items())  # nothing rewritten
    table = pq.read_table(out)
    assert sorted(table.column("id").to_pylist()) == [r["id"] for r in rows]  # every id once
    assert all(0.0 <= s <= 1.0 for s in table.column("score").to_pylist())
