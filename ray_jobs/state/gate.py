"""The quality gate's decisions, with no Ray in it: which subjects are under the gate, which recipe their next
attempt trains with, and which attempt is kept.

A subject is under the gate when its mean DINO is under `gate_min_dino` or its mean CLIP-T under `gate_min_clip_t`
(either None: not gated), or, with `gate_relative` = k, its DINO more than k median absolute deviations under the
median of the run's first-attempt DINO means: the robust outlier rule, a bar for models the paper gives none for,
taken from the run and its spread rather than tuned to a scale (random tiny evaluation models put every DINO mean
within a few hundredths; real ones spread over tenths). DINO only: CLIP-T's scale changes with each subject's prompts. The next attempt's recipe answers the score that failed, as the DreamBooth paper reads
them: DINO low means the subject was not learned (more steps); CLIP-T low means the prompt lost to the subject, the
paper's sign of overfitting (fewer steps, and more prior weight where prior preservation is on). Both low is not
overfitting (that raises DINO): the subject was not learned, so DINO's remedy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from engine.settings import Settings

GATED = (("dino", "gate_min_dino"), ("clip_t", "gate_min_clip_t"))
RELATIVE = "dino"  # the score `gate_relative` sets a bar for
MORE_STEPS = 1.5  # DINO low: half as many steps again
FEWER_STEPS = 0.5  # CLIP-T low: half the steps...
MORE_PRIOR_WEIGHT = 2.0  # ...and the prior loss twice as heavy


@dataclass(frozen=True)
class GateAttempt:
    """One training of a subject: the first (0), or its k-th retrain under the gate."""

    attempt: int
    run: str  # the run directory that holds it: RUN for attempt 0, RUN/gate/attempt-<k> for retrains
    params: dict[str, Any]  # its settings overrides: the manifest row's params, plus the gate's adjustments
    scores: dict[str, Any] | None  # its evaluation means (status.json's `evaluation`); None: not scored
    shortfall: dict[str, float] = field(default_factory=dict)  # each gated score under its bar, by how much

    def to_json(self) -> dict[str, Any]:
        kept = ("images", "dino", "clip_i", "clip_t", "pres")
        scores = {k: v for k, v in (self.scores or {}).items() if k in kept} if self.scores is not None else None
        return {"attempt": self.attempt, "run": self.run, "params": self.params, "scores": scores,
                "under_gate": sorted(self.shortfall)}  # fmt: skip


def gate_on(settings: Settings) -> bool:
    absolute = any(getattr(settings, bar) is not None for _, bar in GATED)
    return (absolute or settings.gate_relative is not None) and settings.evaluate


def spreads(first_scores: list[dict[str, Any] | None]) -> dict[str, tuple[float, float]]:
    """The run's (median, median absolute deviation) of each gated score over its subjects' first attempts."""
    found = {}
    for metric, _ in GATED:
        values = [v for s in first_scores if isinstance(v := (s or {}).get(metric), int | float) and math.isfinite(v)]
        if values:
            middle = _median(values)
            found[metric] = (middle, _median([abs(v - middle) for v in values]))
    return found


def _median(values: list[float]) -> float:
    ordered, middle = sorted(values), len(values) // 2
    return ordered[middle] if len(values) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def gate_bars(settings: Settings, run_spreads: dict[str, tuple[float, float]] | None = None) -> dict[str, float]:
    """Each gated score's bar: its absolute one, DINO's relative one from the run's spread, the higher of both."""
    bars = {}
    for metric, bar_name in GATED:
        candidates = [getattr(settings, bar_name)]
        spread = (run_spreads or {}).get(metric)
        if metric == RELATIVE and settings.gate_relative is not None and spread is not None:
            median, deviation = spread
            candidates.append(median - settings.gate_relative * deviation)
        if present := [c for c in candidates if c is not None]:
            bars[metric] = max(present)
    return bars


def shortfall(scores: dict[str, Any] | None, settings: Settings,
              run_spreads: dict[str, tuple[float, float]] | None = None) -> dict[str, float]:  # fmt: skip
    """Each gated score under its bar, with how far under it is; a score missing (nothing scored) is under by its
    whole bar plus one, so any scored attempt beats it."""
    under = {}
    for metric, bar in gate_bars(settings, run_spreads).items():
        value = (scores or {}).get(metric)
        if not isinstance(value, int | float) or not math.isfinite(value):
            under[metric] = abs(bar) + 1.0
        elif value < bar:
            under[metric] = bar - value
    return under


def attempt(number: int, run: str, params: dict[str, Any], scores: dict[str, Any] | None, settings: Settings,
            run_spreads: dict[str, tuple[float, float]] | None = None) -> GateAttempt:  # fmt: skip
    return GateAttempt(number, run, dict(params), scores, shortfall(scores, settings, run_spreads))


def next_recipe(last: GateAttempt, subject_settings: Settings) -> dict[str, Any]:
    """The params of the attempt after `last` (whose effective settings are `subject_settings`): `last`'s params
    with the adjustment its failed score asks for."""
    params = dict(last.params)
    steps = subject_settings.max_train_steps
    if "dino" in last.shortfall:
        params["max_train_steps"] = math.ceil(steps * MORE_STEPS)
    else:
        params["max_train_steps"] = max(1, math.floor(steps * FEWER_STEPS))
        if subject_settings.with_prior_preservation:
            params["prior_loss_weight"] = subject_settings.prior_loss_weight * MORE_PRIOR_WEIGHT
    if subject_settings.lr_warmup_steps > params["max_train_steps"]:
        params["lr_warmup_steps"] = params["max_train_steps"]
    return params


def best(attempts: list[GateAttempt]) -> GateAttempt:
    """The attempt to keep: the least short of the gate (one that passes first), then the higher gated scores,
    then the earlier."""

    def rank(a: GateAttempt) -> tuple:
        gated = sum(v for k, v in (a.scores or {}).items() if k in dict(GATED) and isinstance(v, int | float))
        return (sum(a.shortfall.values()), -gated, a.attempt)

    return min(attempts, key=rank)


def needs_retry(attempts: list[GateAttempt], settings: Settings) -> bool:
    """Whether a subject with these attempts (all scored, in order) trains once more: its best is under the gate
    and it has retrains left."""
    return bool(best(attempts).shortfall) and len(attempts) - 1 < settings.gate_retries
