"""The driver's live view of a fleet run or a VLM pass: one progress bar with done / failed / running counts and an
ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


class FleetProgress:
    def __init__(self, total: int, enabled: bool = True, label: str = "subjects"):
        self.done = self.failed = self.running = 0
        self.enabled = enabled
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("done {task.fields[done]} · failed {task.fields[failed]} · running {task.fields[running]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            disable=not enabled,
        )
        self._task = self._bar.add_task(label, total=total, done=0, failed=0, running=0)

    def __enter__(self) -> FleetProgress:
        self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.stop()

    def _refresh(self, advance: int = 0) -> None:
        self._bar.update(self._task, advance=advance, done=self.done, failed=self.failed, running=self.running)

    def set_running(self, running: int) -> None:
        if running != self.running:
            self.running = running
            self._refresh()

    def finished(self, ok: bool) -> None:
        self.add(int(ok), int(not ok))

    def add(self, done: int, failed: int) -> None:
        self.done += done
        self.failed += failed
        self._refresh(advance=done + failed)


def print_summary(counts: dict[str, int], failures: list[tuple[str, str]], console: Console | None = None) -> None:
    """The final table: subjects by state, then every failure with its reason."""
    console = console or Console()
    table = Table(title="subjects by state")
    for state in counts:
        table.add_column(state, justify="right")
    table.add_row(*(str(n) for n in counts.values()))
    console.print(table)
    if failures:
        failed = Table(title="failed")
        failed.add_column("subject / row")
        failed.add_column("reason", overflow="fold")
        for who, reason in failures:
            failed.add_row(who, reason)
        console.print(failed)


EVAL_COLUMNS = (("dino", "DINO"), ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"), ("pres", "PRES"))
WORST_SHOWN = 5


def print_evaluation(evaluations: dict[str, dict], console: Console | None = None) -> None:
    """The evaluation pass's figures: the run's means over its evaluated subjects, then the lowest by DINO (the
    paper's subject-fidelity figure), so the subjects to look at first are named."""
    if not evaluations:
        return
    console = console or Console()
    table = Table(title=f"evaluation: mean over {len(evaluations)} subject(s)")
    kept = []
    for key, title in EVAL_COLUMNS:
        values = [e[key] for e in evaluations.values() if e.get(key) is not None]
        if values:
            table.add_column(title, justify="right")
            kept.append(f"{sum(values) / len(values):.3f}")
    table.add_row(*kept)
    console.print(table)
    scored = sorted((e["dino"], sid) for sid, e in evaluations.items() if e.get("dino") is not None)
    if scored:
        worst = Table(title=f"lowest DINO (of {len(scored)})")
        worst.add_column("subject")
        for _, title in EVAL_COLUMNS:
            worst.add_column(title, justify="right")
        for _, sid in scored[:WORST_SHOWN]:
            e = evaluations[sid]
            worst.add_row(sid, *("" if e.get(k) is None else f"{e[k]:.3f}" for k, _ in EVAL_COLUMNS))
        console.print(worst)
