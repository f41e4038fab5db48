"""Data-parallel training on CPU: two processes (gloo) with train_batch_size B train a subject as one process with
2B does, rank 0 alone writes, and a rank that fails stops the other, which can then resume with it from the checkpoint.

The two ranks are spawned once for the module and run every scenario in turn (a process costs seconds of imports).
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from engine.diffusion.class_images import ClassImageCache
from engine.diffusion.subject import Subject
from engine.diffusion.train import train_subject
from engine.settings import Settings, load_settings
from tests.helpers.subjects import draw_subject
from tests.helpers.training import Interrupted, stop_at

PROMPT, CLASS_PROMPT = "a photo of sks ball", "a photo of a ball"

# Measured on this CPU: losses agree to ~3e-7 and weights to ~1e-5 (LoRA), ~3e-4 (LoRA with the text encoder and
# accumulation), ~5e-5 (full fine-tune). The samples, noise and timesteps are the same; what differs is the order of
# the reductions (two half-batch means averaged, gradients summed by gloo then halved), convolutions blocked over a
# batch of B instead of 2B, and one thread instead of two: last-bit differences that AdamW's normalisation amplifies
# a little each step. The same bounds as packed subjects against alone (tests/engine/test_train.py).
LOSS_TOLERANCE, WEIGHT_TOLERANCE = 1e-5, 2e-3

STEPS, INTERVAL, STOP_AT = 6, 3, 3
# Prior preservation on; the text encoder's gradients are averaged by hand, the UNet's by DDP, and accumulation
# micro-batches skip DDP's all-reduce (no_sync): each of them takes part.
LORA = {"max_train_steps": STEPS, "checkpointing_steps": INTERVAL, "train_text_encoder": True,
        "gradient_accumulation_steps": 2}  # fmt: skip
FULL = {"mode": "full", "max_train_steps": 4, "checkpointing_steps": 2}
ALONE = {"max_train_steps": 2, "with_prior_preservation": False}


def _settings(overrides: dict, batch: int, ranks: int) -> Settings:
    return load_settings("tiny", overrides={**overrides, "train_batch_size": batch, "data_parallel": ranks})


def _rank(rank: int, ports: list[int], tiny: str, subject: Subject, class_uris: list[str], out: str) -> None:
    """One of the two processes: every scenario in turn, each rank's findings written to out/rank<r>.json."""
    from engine.diffusion import data_parallel
    from engine.diffusion.base_model import load_base_model

    torch.set_num_threads(1)  # two processes on the test machine's cores
    base = load_base_model(Path(tiny), "cpu")
    found: dict = {}

    def join(port: int) -> None:
        data_parallel.join(rank, 2, "127.0.0.1", port, base.device, collective_timeout=timedelta(seconds=60))

    join(ports[0])
    for name, overrides in (("lora", LORA), ("full", FULL)):
        result = train_subject(base, subject, _settings(overrides, 1, 2), f"{out}/{name}/rank{rank}", class_uris)
        found[name] = result.losses
    # Rank 0 stops after its step 3 (and its checkpoint); rank 1 finds its peer gone at the next collective.
    try:
        train_subject(base, subject, _settings(LORA, 1, 2), f"{out}/resumed", class_uris, stop_at(STOP_AT))
    except (Interrupted, data_parallel.PeerFailedError) as err:
        found["interrupted_by"] = type(err).__name__
    data_parallel.leave()
    join(ports[1])  # a new group, as a retry on the fleet gets
    resumed = train_subject(base, subject, _settings(LORA, 1, 2), f"{out}/resumed", class_uris)
    found["resumed"] = {"from": resumed.resumed_from, "losses": resumed.losses}
    data_parallel.leave()
    if rank == 0:  # out of the group, the same process trains an ordinary subject: no DDP hook is left behind
        found["alone"] = train_subject(base, subject, load_settings("tiny", overrides=ALONE), f"{out}/alone").losses
    Path(out, f"rank{rank}.json").write_text(json.dumps(found))


@pytest.fixture(scope="module")
def two_ranks(base, tiny_path, tmp_path_factory) -> tuple[Path, Subject, list[str], list[dict]]:
    from engine.diffusion import data_parallel

    out = tmp_path_factory.mktemp("data-parallel")
    (out / "images").mkdir()
    images = tuple(str(draw_subject(out / "images" / f"{i}.png", shift=i)) for i in range(4))
    # A prompt per photo (curation's captions): each rank conditions its own rows on their own photos' prompts
    subject = Subject("ball-1", images, PROMPT, CLASS_PROMPT, seed=7,
                      instance_prompts=tuple(f"{PROMPT}, view {i}" for i in range(4)))  # fmt: skip
    class_uris = ClassImageCache(str(out / "class_images")).ensure(base, CLASS_PROMPT, _settings(LORA, 2, 1)).uris
    ports = [data_parallel.free_port(), data_parallel.free_port()]
    mp.start_processes(_rank, args=(ports, str(tiny_path), subject, class_uris, str(out)), nprocs=2,
                       start_method="spawn")  # fmt: skip
    return out, subject, class_uris, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _weights(folder: Path, mode: str) -> dict[str, torch.Tensor]:
    if mode == "lora":
        return load_file(folder / "weights" / "pytorch_lora_weights.safetensors")
    return load_file(next((folder / "weights" / "unet").glob("*.safetensors")))


@pytest.mark.parametrize("name, overrides", [("lora", LORA), ("full", FULL)])
def test_two_ranks_with_batch_b_train_as_one_process_with_2b(base, two_ranks, name, overrides):
    out, subject, class_uris, ranks = two_ranks
    one = train_subject(base, subject, _settings(overrides, 2, 1), str(out / name / "one"), class_uris)

    assert ranks[0][name] == ranks[1][name]  # every rank logs the global losses
    assert len(one.losses) == len(ranks[0][name])
    assert max(abs(a - b) for a, b in zip(one.losses, ranks[0][name])) <= LOSS_TOLERANCE
    mode = overrides.get("mode", "lora")
    assert _max_difference(_weights(out / name / "one", mode), _weights(out / name / "rank0", mode)) <= WEIGHT_TOLERANCE


def test_only_rank_0_writes_checkpoints_log_and_weights(two_ranks):
    out = two_ranks[0]
    for name in ("lora", "full"):
        assert sorted(p.name for p in (out / name / "rank0").iterdir()) == ["checkpoints", "train_log.jsonl", "weights"]
        assert not (out / name / "rank1").exists()


def test_a_failed_rank_stops_the_other_and_both_resume_from_the_checkpoint(two_ranks):
    ranks = two_ranks[3]
    assert [r["interrupted_by"] for r in ranks] == ["Interrupted", "PeerFailedError"]
    for found in ranks:
        assert found["resumed"]["from"] == STOP_AT
        # bit for bit the uninterrupted run: same draws, same optimizer state, the same reductions in the same order
        assert found["resumed"]["losses"] == found["lora"]


def test_a_process_out_of_its_group_trains_ordinary_subjects_as_before(base, two_ranks, tmp_path):
    subject = two_ranks[1]
    alone = train_subject(base, subject, load_settings("tiny", overrides=ALONE), str(tmp_path / "alone"))
    assert max(abs(a - b) for a, b in zip(alone.losses, two_ranks[3][0]["alone"])) <= LOSS_TOLERANCE
