"""Planning and the run directory, without Ray: what a (re)run will do is decided from files alone."""

import pytest

from engine.diffusion.base_model import resolve_base_model
from engine.diffusion.families import with_family_defaults
from engine.diffusion.subject import Subject
from engine.settings import load_settings
from ray_jobs.fleet.scheduler import oom_adjusted
from ray_jobs.state.manifest import RowError
from ray_jobs.state.plan import plan_fleet, row_has_own_folder
from ray_jobs.state.run_dir import RunConflictError, RunDirectory, SubjectStatus


def _subject(i: int, cls: str, params=None) -> Subject:
    return Subject(f"s{i}", ("x.png",), f"a photo of sks {cls}", f"a photo of a {cls}", params=params or {})


def test_one_class_set_per_distinct_prompt_and_settings():
    settings = load_settings("tiny")
    subjects = [_subject(0, "dog"), _subject(1, "dog"), _subject(2, "cat"), _subject(3, "dog", {"resolution": 64})]
    plan = plan_fleet(subjects, [], {}, settings, "fp")
    assert len(plan.class_sets) == 3  # dog@32, cat@32, dog@64
    assert plan.subjects[0].class_set == plan.subjects[1].class_set != plan.subjects[2].class_set
    assert plan.subjects[3].settings.resolution == 64


def test_a_rerun_skips_trained_subjects_and_retries_the_rest():
    settings = load_settings("tiny")
    subjects = [_subject(i, "dog") for i in range(4)]
    existing = {
        "s0": SubjectStatus("s0", "trained", 1),
        "s1": SubjectStatus("s1", "done", 1),
        "s2": SubjectStatus("s2", "failed", 3, "boom"),
        "s3": SubjectStatus("s3", "training", 1),
    }
    plan = plan_fleet(subjects, [], existing, settings, "fp")
    assert plan.finished == ["s0", "s1"]
    assert [j.subject.subject_id for j in plan.subjects] == ["s2", "s3"]
    assert plan.subjects[0].status.attempts == 3  # history is kept across invocations


def test_stages_follow_each_subject_state():
    settings = load_settings("tiny")
    subjects = [_subject(i, "dog") for i in range(5)]
    existing = {
        "s0": SubjectStatus("s0", "done", 2),
        "s1": SubjectStatus("s1", "trained", 1),
        "s2": SubjectStatus("s2", "failed", 2, "boom", history=[{"stage": "train", "ok": True}, {"stage": "generate", "ok": False}]),
        "s3": SubjectStatus("s3", "failed", 3, "bad image", history=[{"stage": "train", "ok": False}]),
    }
    run = plan_fleet(subjects, [], existing, settings, "fp", ("train", "generate"))
    assert {j.subject.subject_id: j.stages for j in run.subjects} == {
        "s1": ("generate",), "s2": ("generate",), "s3": ("train", "generate"), "s4": ("train", "generate"),
    }  # fmt: skip
    assert run.finished == ["s0"]
    assert len(run.class_sets) == 1  # only subjects that still train need class images
    generate = plan_fleet(subjects, [], existing, settings, "fp", ("generate",))
    assert [j.subject.subject_id for j in generate.subjects] == ["s1", "s2"]
    assert generate.not_trained == ["s3", "s4"] and generate.class_sets == []


def test_without_prior_preservation_no_class_set_is_planned():
    settings = load_settings("tiny", overrides={"with_prior_preservation": False})
    plan = plan_fleet([_subject(0, "dog")], [], {}, settings, "fp")
    assert plan.class_sets == [] and plan.subjects[0].class_set is None


def test_bad_rows_get_a_folder_only_with_a_safe_unique_id():
    good = {"ok"}
    bad = [RowError(1, "dup", "x"), RowError(2, "dup", "y"), RowError(3, "../etc", "z"), RowError(4, "lone", "w")]
    ids = [e.subject_id for e in bad]
    assert [row_has_own_folder(e, good, ids) for e in bad] == [False, False, False, True]
    assert not row_has_own_folder(RowError(5, "ok", "dup of a good row"), good, [*ids, "ok"])


def test_oom_retry_first_checkpoints_then_halves_the_micro_batch():
    s = load_settings("tiny", overrides={"train_batch_size": 4})
    first = oom_adjusted(s)
    assert first.gradient_checkpointing and first.train_batch_size == 4
    second = oom_adjusted(first)
    assert (second.train_batch_size, second.gradient_accumulation_steps) == (2, 2)


def _start(run: RunDirectory, fingerprint="abc", settings=None, extend=False):
    return run.start(
        command="train", manifest_uri="m.parquet", manifest_fingerprint=fingerprint,
        settings=settings or load_settings("tiny"), base_model="tiny", base_model_path="/cache/tiny", extend=extend,
    )  # fmt: skip


def test_a_run_refuses_another_manifest_or_settings_unless_extended(tmp_path):
    run = RunDirectory(str(tmp_path / "run"))
    record = _start(run)
    assert record["base_model_path"] == "/cache/tiny" and "torch" in record["versions"]
    _start(run)  # same manifest and settings: a resume
    _start(run, settings=load_settings("tiny", overrides={"max_attempts": 9}))  # operational: allowed
    with pytest.raises(RunConflictError, match="another manifest"):
        _start(run, fingerprint="def")
    with pytest.raises(RunConflictError, match="max_train_steps: 100 -> 5"):
        _start(run, settings=load_settings("tiny", overrides={"max_train_steps": 5}))
    _start(run, fingerprint="def", extend=True)
    assert len(run.read_run()["invocations"]) == 4


def test_a_run_recorded_with_the_default_targets_spelled_out_resumes_without_extend(tmp_path):
    """Runs recorded their LoRA targets as a list before the default became "the base family's"; the driver records
    the family's list, so such a RUN is the same settings, not a conflict."""
    tiny = resolve_base_model("tiny")
    run = RunDirectory(str(tmp_path / "run"))
    recorded = load_settings("tiny", overrides={"lora_target_modules": ["to_k", "to_q", "to_v", "to_out.0"]})
    _start(run, settings=recorded)
    _start(run, settings=with_family_defaults(load_settings("tiny"), tiny))


def test_statuses_round_trip_through_the_run_directory(tmp_path):
    run = RunDirectory(str(tmp_path))
    run.write_status(SubjectStatus("a", "failed", 2, "bad image"))
    run.write_status(SubjectStatus("b", "trained", 1))
    statuses = run.read_statuses()
    assert statuses["a"].error == "bad image" and statuses["b"].state == "trained"
    assert not list(tmp_path.rglob("*.tmp-*"))  # atomic writes leave no temporaries
