"""A subject's states and what each means, in one place: the per-subject stages (train, generate) move a subject
from the state before the stage, through the state while it runs, to the state after it; `failed` ends it.

status.json holds these strings; the scheduler, the plan, the run summary, the metrics and the report read them here.
"""

from __future__ import annotations

from dataclasses import dataclass

PENDING = "pending"  # nothing done yet (or training interrupted: its checkpoints are kept)
TRAINING = "training"  # a worker trains it now, or its driver was killed while one did
TRAINED = "trained"  # its weights are in RUN; images not (all) rendered
GENERATING = "generating"  # a worker renders it now, or its driver was killed while one did
DONE = "done"  # trained and every image rendered
FAILED = "failed"  # its attempts are used up, or its input can never work; the error says why

STATES = (PENDING, TRAINING, TRAINED, GENERATING, DONE, FAILED)
TRAINED_STATES = frozenset({TRAINED, GENERATING, DONE})  # weights in RUN: a rerun does not retrain
RUNNING_STATES = frozenset({TRAINING, GENERATING})  # only while a driver works on the subject


@dataclass(frozen=True)
class Stage:
    """A per-subject stage and the states it moves a subject through."""

    name: str
    before: str  # where a subject waits for this stage, and goes back to when an attempt fails and is retried
    running: str
    after: str


STAGES = {
    "train": Stage("train", before=PENDING, running=TRAINING, after=TRAINED),
    "generate": Stage("generate", before=TRAINED, running=GENERATING, after=DONE),
}
# The stage a subject in each state is at (or failed in, for `failed`: generation failures keep `trained` until
# their attempts run out, so a failed subject without a trained history failed training).
STAGE_OF_STATE = {PENDING: "train", TRAINING: "train", FAILED: "train", TRAINED: "generate", GENERATING: "generate"}
# The state a whole command leaves its subjects in when it succeeds, by its last stage; the passes after generation
# (moderation, evaluation) leave subjects `done`.
FINAL_STATE = {"train": TRAINED, "generate": DONE, "moderate": DONE, "evaluate": DONE}
