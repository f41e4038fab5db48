"""The quality gate's decisions without Ray: who is under the gate, the next recipe, which attempt is kept."""

from __future__ import annotations

import math

import pytest

from engine.settings import load_settings
from ray_jobs.state.gate import attempt, best, gate_bars, gate_on, needs_retry, next_recipe, shortfall, spreads


def _settings(**values):
    return load_settings("tiny", overrides=values)


def test_the_gate_is_off_until_a_bar_is_set_and_needs_the_evaluation():
    assert not gate_on(_settings())
    assert gate_on(_settings(gate_min_dino=0.5)) and gate_on(_settings(gate_min_clip_t=0.2))
    assert not gate_on(_settings(gate_min_dino=0.5, evaluate=False))


def test_each_gated_score_under_its_bar_is_named_with_how_far():
    settings = _settings(gate_min_dino=0.6, gate_min_clip_t=0.25)
    assert shortfall({"dino": 0.7, "clip_t": 0.3}, settings) == {}
    assert shortfall({"dino": 0.5, "clip_t": 0.3}, settings) == {"dino": pytest.approx(0.1)}
    assert set(shortfall({"dino": 0.5, "clip_t": 0.2}, settings)) == {"dino", "clip_t"}
    assert shortfall({"dino": 0.1, "clip_t": 0.9}, _settings(gate_min_clip_t=0.25)) == {}  # DINO not gated
    assert shortfall(None, settings) == {"dino": 1.6, "clip_t": 1.25}  # nothing scored: under by more than any score
    assert "dino" in shortfall({"dino": math.nan, "clip_t": 0.3}, settings)


def test_identity_too_low_trains_longer_and_prompt_fidelity_too_low_trains_shorter_with_more_prior():
    settings = _settings(gate_min_dino=0.6, gate_min_clip_t=0.25, max_train_steps=100, prior_loss_weight=1.0)
    low_dino = attempt(0, "run", {"learning_rate": 0.01}, {"dino": 0.3, "clip_t": 0.3}, settings)
    assert next_recipe(low_dino, settings) == {"learning_rate": 0.01, "max_train_steps": 150}  # own params kept
    overfit = attempt(0, "run", {}, {"dino": 0.8, "clip_t": 0.1}, settings)
    assert next_recipe(overfit, settings) == {"max_train_steps": 50, "prior_loss_weight": 2.0}
    # Without prior preservation there is no prior weight to raise; warmup never outlasts the shorter training.
    alone = _settings(gate_min_clip_t=0.25, max_train_steps=10, with_prior_preservation=False, lr_warmup_steps=8)
    assert next_recipe(attempt(0, "run", {}, {"clip_t": 0.1}, alone), alone) == {"max_train_steps": 5,
                                                                                 "lr_warmup_steps": 5}
    # Both low is not overfitting (that raises DINO): the subject was not learned, so more steps.
    both = attempt(0, "run", {}, {"dino": 0.3, "clip_t": 0.1}, settings)
    assert next_recipe(both, settings)["max_train_steps"] == 150


def test_the_better_attempt_is_kept_and_retries_stop_at_the_bar_or_the_budget():
    settings = _settings(gate_min_dino=0.6, gate_retries=2)
    first = attempt(0, "run", {}, {"dino": 0.5}, settings)
    worse = attempt(1, "run/gate/attempt-1", {"max_train_steps": 150}, {"dino": 0.4}, settings)
    passing = attempt(1, "run/gate/attempt-1", {"max_train_steps": 150}, {"dino": 0.65}, settings)
    failed = attempt(1, "run/gate/attempt-1", {"max_train_steps": 150}, None, settings)  # its retrain failed
    assert best([first, worse]) is first and best([first, passing]) is passing and best([first, failed]) is first
    assert needs_retry([first], settings) and needs_retry([first, worse], settings)
    assert not needs_retry([first, passing], settings)  # its best passes
    assert not needs_retry([first, worse, worse], settings)  # two retrains used
    assert not needs_retry([first], _settings(gate_min_dino=0.6, gate_retries=0))
    both_pass = [attempt(0, "run", {}, {"dino": 0.7}, settings), attempt(1, "r", {}, {"dino": 0.9}, settings)]
    assert best(both_pass).attempt == 1  # both pass: the higher scores
    assert attempt(1, "r", {"max_train_steps": 150}, {"dino": 0.4, "clip_i": 0.2, "evaluated_at": "t"},
                   settings).to_json() == {"attempt": 1, "run": "r", "params": {"max_train_steps": 150},
                                           "scores": {"dino": 0.4, "clip_i": 0.2}, "under_gate": ["dino"]}


def test_a_relative_gate_is_k_median_absolute_deviations_under_the_runs_median_first_attempt_dino():
    settings = _settings(gate_relative=3)
    assert gate_on(settings) and not gate_on(_settings(gate_relative=3, evaluate=False))
    # Random tiny evaluation models: every mean within hundredths, one subject well under the rest.
    run = spreads([{"dino": 0.94, "clip_t": 0.2}, {"dino": 0.93}, {"dino": 0.97, "clip_t": -0.1}, {"dino": 0.84},
                   None])  # fmt: skip
    assert run["dino"] == (pytest.approx(0.935), pytest.approx(0.02)) and run["clip_t"][0] == pytest.approx(0.05)
    assert gate_bars(settings, run) == {"dino": pytest.approx(0.875)}  # DINO only: CLIP-T's scale is each prompt's
    assert shortfall({"dino": 0.84, "clip_t": -0.1}, settings, run) == {"dino": pytest.approx(0.035)}
    assert shortfall({"dino": 0.93, "clip_t": -0.1}, settings, run) == {}
    # The same rule on a real model's scale: only the spread sets how far under is too far.
    real = spreads([{"dino": 0.70}, {"dino": 0.60}, {"dino": 0.65}, {"dino": 0.30}])
    assert gate_bars(settings, real)["dino"] == pytest.approx(0.625 - 3 * 0.05)
    assert gate_bars(settings, spreads([{"dino": 0.5}])) == {"dino": 0.5}  # one subject: nothing stands out under it
    # With an absolute bar as well, the higher bar holds.
    assert gate_bars(_settings(gate_relative=3, gate_min_dino=0.9), run)["dino"] == 0.9
